"""Checkpoint folders: written under a temp name and renamed, so a crash never leaves half of one.

Every checkpoint is a model folder (`AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` load it directly:
fp32 safetensors, config, tokenizer) plus `sftkey.json` (what made it: arm, seed, stage, step, data version,
config, the precision it trained in) written last, and the trainer state a resume needs: `optimizer.pt` and
`scheduler.pt` (periodic checkpoints only: a stage-final one starts the next stage with a fresh optimizer),
`rng_state_<rank>.pt`, and with LoRA the adapter in `adapter/` (the folder itself holds the merged model).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

from sftkey.atomic import swap_folder, write_text

META_FILE = "sftkey.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
ADAPTER_DIR = "adapter"
FINAL_SUFFIX = "-final"


def periodic_name(global_step: int) -> str:
    return f"step-{global_step:08d}"


def final_name(stage: str) -> str:
    return f"{stage}{FINAL_SUFFIX}"


def rng_file(rank: int) -> str:
    return f"rng_state_{rank}.pt"


def temp_folder(folder: Path) -> Path:
    """Where `folder` is assembled; the leading dot keeps it out of every search for checkpoints."""
    return folder.with_name(f".{folder.name}.tmp")


def begin(folder: Path) -> Path:
    """A fresh, empty temp folder for `folder` (a stale one from a crash is removed)."""
    tmp = temp_folder(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, folder: Path, meta: dict) -> Path:
    """Write sftkey.json last, then rename the temp folder into place (an older `folder` is swapped out)."""
    write_json(tmp / META_FILE, meta)
    return swap_folder(tmp, folder)


def write_json(path: Path, data: dict) -> None:
    """Atomic: temp file, then rename."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_meta(folder: Path) -> dict | None:
    """The checkpoint's sftkey.json, or None where the folder is not a complete checkpoint."""
    try:
        return json.loads((Path(folder) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def complete_checkpoints(checkpoints: Path) -> list[tuple[Path, dict]]:
    """Complete checkpoints, oldest first: by stage, then step; a stage's final one after its periodic ones."""
    found = []
    if Path(checkpoints).is_dir():
        for folder in Path(checkpoints).iterdir():
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            meta = read_meta(folder)
            if meta is not None:
                found.append((folder, meta))
    return sorted(found, key=lambda item: (item[1]["stage_index"], item[1]["step"], item[1]["final"]))


def latest(checkpoints: Path) -> tuple[Path, dict] | None:
    found = complete_checkpoints(checkpoints)
    return found[-1] if found else None


def prune_periodic(checkpoints: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` periodic checkpoints; stage-final ones stay."""
    periodic = [folder for folder, meta in complete_checkpoints(checkpoints) if not meta["final"]]
    removed = periodic[: max(0, len(periodic) - keep_last)]
    for folder in removed:
        shutil.rmtree(folder)
    return removed


def prune_finished_stages(checkpoints: Path, stage_index: int) -> list[Path]:
    """Delete the periodic checkpoints of stage `stage_index` and earlier ones (`train.keep_final_only`): called once
    the stage's final checkpoint is committed, so a crash before that still finds them to resume from."""
    periodic = [folder for folder, meta in complete_checkpoints(checkpoints)
                if not meta["final"] and meta["stage_index"] <= stage_index]
    for folder in periodic:
        shutil.rmtree(folder)
    return periodic


def load_problem(folder: Path, meta: dict) -> str | None:
    """Why `folder` would not load, or None: a cheap structural check of every file a resume or the next stage reads.

    Safetensors: the header parses and the file is as long as the header says. Torch files (.pt, .bin) are zip
    archives, whose directory sits at the end, so a zero-byte or truncated one does not open as a zip.
    """
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return "no *.safetensors weights"
    if (folder / ADAPTER_DIR).is_dir():  # LoRA: a resume loads the adapter
        weights += sorted((folder / ADAPTER_DIR).glob("*.safetensors")) or [folder / ADAPTER_DIR / "adapter_model.safetensors"]
    for path in weights:
        problem = _safetensors_problem(path)
        if problem:
            return f"{path.relative_to(folder)} {problem}"
    needed = list(folder.glob("rng_state_*.pt"))
    if not meta.get("final"):
        optimizer = [folder / name for name in (OPTIMIZER_FILE, "optimizer.bin") if (folder / name).exists()]
        needed += (optimizer or [folder / OPTIMIZER_FILE]) + [folder / SCHEDULER_FILE]
    for path in needed:
        problem = _torch_file_problem(path)
        if problem:
            return f"{path.name} {problem}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or length > size - 8:
                return f"is cut ({size} bytes)"
            header = json.loads(f.read(length))
        end = max((t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"), default=0)
    except FileNotFoundError:
        return "is missing"
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"has an unreadable header ({type(e).__name__})"
    return None if size == 8 + length + end else f"is {size} bytes, its header says {8 + length + end}"


def _torch_file_problem(path: Path) -> str | None:
    import zipfile

    if not path.exists():
        return "is missing"
    try:
        with zipfile.ZipFile(path):
            return None
    except (OSError, zipfile.BadZipFile):
        return f"is not a complete torch file ({path.stat().st_size} bytes)"


def set_aside(folder: Path) -> Path:
    """Rename a checkpoint that does not load to a dotted name (kept for a look, out of every search for checkpoints)."""
    target = folder.with_name(f".{folder.name}.bad")
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f".{folder.name}.bad{n}")
    os.rename(folder, target)
    return target


def link_copy(source: Path, target: Path) -> None:
    """Copy a folder tree with hard links where the file system allows (a reused stage costs no disk)."""
    shutil.copytree(source, target, copy_function=_link_or_copy)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def rng_state() -> dict:
    import torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
