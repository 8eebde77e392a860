"""Shared fixtures: the tiny tokenizer/model (built offline in seconds), the real data when present, and
`run_cli`, the `sftkey` command run in this process (no interpreter start-up per call)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 5x faster for small models on this 2-core machine
# One cell or run at a time by default (sftkey.train.parallel_runs): the suite's pipelines run in process, the same on
# a CI machine of any core count; the tests of the parallel paths ask for their processes explicitly.
os.environ.setdefault("SFTKEY_CPU_PROCESSES", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub
os.environ.setdefault("SFTKEY_HUB_TIMEOUT_S", "2")  # the 8 s default is for the real internet; tests fake the hub

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from sftkey.tiny import train_tiny_tokenizer

    return train_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from sftkey.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


EXTRA_EOS = [141, 150]  # tokens the varied tiny model emits at different steps: rows stop at different times


@pytest.fixture(scope="module")  # per module: a backend may change the model it is given
def model_and_tokenizer(tiny_model_dir):
    """The tiny model with larger random weights (varied outputs instead of one repeated token) and extra eos ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *EXTRA_EOS]
    return model, tokenizer


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (the project's ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The default model's tokenizer, when its converted folder is already cached (never converts in a test)."""
    from sftkey.models import default_model_dir, is_provisioned

    folder = default_model_dir()
    if not is_provisioned(folder):
        pytest.skip(f"default model not cached at {folder}; run `sftkey prepare --model default ...` once")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@dataclass(frozen=True)
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def _process_state_restored():
    """Undo what a command changes in its process: environment, signal handlers, root logging, warning filters,
    working directory (a real `sftkey` process simply exits with them)."""
    environ, cwd = dict(os.environ), os.getcwd()
    handlers = {s: signal.getsignal(s) for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)}
    root = logging.getLogger()
    level, root_handlers = root.level, list(root.handlers)
    try:
        with warnings.catch_warnings():
            yield
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
        for signum, handler in handlers.items():
            if handler is not None and signal.getsignal(signum) is not handler:  # None: set outside Python
                signal.signal(signum, handler)
        root.setLevel(level)
        root.handlers[:] = root_handlers


@pytest.fixture
def run_cli(capfd):
    """`run_cli(*args, env=None, cwd=None) -> CliResult`: `sftkey ARGS` as the console script runs it
    (`sys.exit(main())`), in this process: the same exit code, and fd-level stdout/stderr of the call only.
    `env` adds to (or, with None values, removes from) the environment for the call. An exception that is not a
    UserError propagates (the real process would print a traceback and exit 1). Output the test printed before
    the call is discarded; it captures with capfd, so a test using it cannot also ask for capsys."""
    from sftkey.cli import main

    def run(*args: str, env: dict[str, str | None] | None = None, cwd: Path | None = None) -> CliResult:
        capfd.readouterr()
        with _process_state_restored():
            for key, value in (env or {}).items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            if cwd is not None:
                os.chdir(cwd)
            try:
                code = main([str(a) for a in args])
            except SystemExit as exit_:  # argparse's usage errors (2), --help (0)
                code = exit_.code
        if isinstance(code, str):  # sys.exit("text") prints the text and exits 1
            print(code, file=sys.stderr)
            code = 1
        out, err = capfd.readouterr()
        return CliResult(0 if code is None else code, out, err)

    return run
