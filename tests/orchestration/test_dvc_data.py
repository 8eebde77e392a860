"""DVC data versions in a real git + DVC repo with a local remote: each content a revision, `dvc.api` reads any
revision back, and the remote alone can serve it."""

from __future__ import annotations

import hashlib
import shutil

from orchestration.dvc_data import DvcResource, git


def test_track_and_read_back_each_revision(tmp_path):
    dvc = DvcResource(repo=str(tmp_path / "repo"), remote=str(tmp_path / "remote"))
    source = tmp_path / "records.jsonl"
    source.write_text('{"uid": "a"}\n')
    first = dvc.track(source, "raw/gsm8k-train.jsonl", "first")
    again = dvc.track(source, "raw/gsm8k-train.jsonl", "same content")
    source.write_text('{"uid": "a"}\n{"uid": "b"}\n')
    second = dvc.track(source, "raw/gsm8k-train.jsonl", "second")

    assert again == first  # unchanged content: no new revision
    assert second.rev != first.rev and second.md5 != first.md5
    assert first.md5 == hashlib.md5(b'{"uid": "a"}\n').hexdigest()  # DVC 3 hashes a file's bytes
    root = dvc.root()
    assert git("log", "--format=%s", cwd=root).splitlines() == ["second", "first", f"dvc remote {tmp_path / 'remote'}"]
    assert dvc.read_text("raw/gsm8k-train.jsonl", first.rev) == '{"uid": "a"}\n'
    assert dvc.read_text("raw/gsm8k-train.jsonl", second.rev) == '{"uid": "a"}\n{"uid": "b"}\n'

    shutil.rmtree(root / ".dvc" / "cache")  # only the remote holds the data now
    assert dvc.read_text("raw/gsm8k-train.jsonl", first.rev) == '{"uid": "a"}\n'


def test_track_a_prepared_folder(tmp_path):
    dvc = DvcResource(repo=str(tmp_path / "repo"), remote=str(tmp_path / "remote"))
    folder = tmp_path / "prepared"
    folder.mkdir()
    (folder / "meta.json").write_text('{"data_version": "abc"}\n')
    (folder / "examples.jsonl").write_text('{"uid": "a", "input_ids": [1, 2]}\n')
    tracked = dvc.track(folder, "prepared/gsm8k-train-tagged", "prepared")
    assert tracked.md5.endswith(".dir")
    assert dvc.read_text("prepared/gsm8k-train-tagged/meta.json", tracked.rev) == '{"data_version": "abc"}\n'
    assert git("status", "--porcelain", cwd=dvc.root()) == ""  # everything committed; data ignored by git


def test_dvc_yaml_stages_mirror_the_pipeline_and_their_commands_parse(tmp_path):
    """dvc.yaml resolves (params, foreach) in a real DVC repo, and each stage's `sftkey ...` command is accepted
    by that command's own argument parser."""
    import argparse
    import importlib
    import shlex
    from pathlib import Path

    from orchestration.dvc_data import dvc_repo, ensure_repo
    from sftkey.cli import COMMANDS

    project = Path(__file__).resolve().parents[2]
    repo = ensure_repo(tmp_path / "repo", str(tmp_path / "remote"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(project / name, repo / name)
    with dvc_repo(repo) as dvc:
        stages = {stage.name: stage.cmd for stage in dvc.index.stages}
    assert sorted(stages) == ["benchmark@sft_tag", "benchmark@sftkey_tag", "compare", "prepare", "train@sft_tag",
                              "train@sftkey_tag"]
    assert stages["benchmark@sftkey_tag"].startswith(
        "sftkey eval --checkpoint runs/demo/sftkey_tag/seed0/checkpoints/stage2-final --dataset gsm8k")
    for address, cmd in stages.items():
        program, command, *args = shlex.split(cmd)
        assert program == "sftkey", address
        parser = argparse.ArgumentParser(prog=f"sftkey {command}", exit_on_error=False)
        importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
        parser.parse_args(args)
