"""The MLflow resource against a real sqlite store: the tracker Protocol, one run per materialization nested under
one parent per Dagster run, failed runs marked FAILED, and an unreachable server failing before any work."""

import http.server
import json
import math
import os
import subprocess
import sys
import threading
import time

import dagster as dg
import pytest

from orchestration.tracking import (
    ASSET_TAG,
    PARENT_TAG,
    MlflowResource,
    MlflowTracker,
    WEIGHTS_DTYPE_TAG,
    TrackingUnavailable,
    flatten,
    metric_name,
    redact,
)

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens there


@pytest.fixture
def tracking(mlflow_db) -> MlflowResource:  # tmp_path/mlflow/mlflow.db, copied migrated (conftest)
    return MlflowResource(tracking_uri=f"sqlite:///{mlflow_db}", experiment="test")


def test_flatten_and_metric_names():
    assert flatten({"train": {"lr": 2e-5, "betas": [0.9, 0.95]}, "lora": None, "tagged": True}) == {
        "train.lr": "2e-05", "train.betas": "[0.9, 0.95]", "lora": "null", "tagged": "true"}
    assert metric_name("gsm8k_tagged/exact_match,strict-match") == "gsm8k_tagged/exact_match/strict-match"


def test_tracker_protocol_writes_params_metrics_and_artifacts(tracking, tmp_path):
    client = tracking.client()
    run_id = client.create_run(tracking.experiment_id()).info.run_id
    tracker = MlflowTracker(client, run_id)
    tracker.log_params({"train": {"lr": 0.001}, "arm": "sft_tag"})
    tracker.log_metrics({"loss": 1.5, "exact_match,strict-match": 0.25, "bad": math.nan}, step=3)
    tracker.log_metric_rows([(1, {"loss": 3.0}), (2, {"loss": 2.0})])
    (tmp_path / "exclusions.jsonl").write_text('{"uid": "a"}\n')
    tracker.log_artifact(tmp_path / "exclusions.jsonl")
    run = client.get_run(run_id)
    assert run.data.params == {"train.lr": "0.001", "arm": "sft_tag"}
    assert run.data.metrics == {"loss": 1.5, "exact_match/strict-match": 0.25}  # NaN left out
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert history == [(1, 3.0), (2, 2.0), (3, 1.5)]
    assert [a.path for a in client.list_artifacts(run_id)] == ["exclusions.jsonl"]


def test_experiment_keeps_artifacts_beside_the_store(tracking, tmp_path):
    experiment = tracking.client().get_experiment(tracking.experiment_id())
    assert experiment.artifact_location == (tmp_path / "mlflow" / "artifacts").as_uri()


@dg.asset
def counted(context: dg.AssetExecutionContext, tracking: MlflowResource) -> int:
    with tracking.asset_run(context) as run:
        run.log_metrics({"value": 7.0})
    return 7


@dg.asset
def broken(context: dg.AssetExecutionContext, tracking: MlflowResource) -> int:
    with tracking.asset_run(context):
        raise RuntimeError("injected failure")


def test_one_run_per_materialization_nested_under_its_dagster_run(tracking):
    # Two materializations in one process: the dagster-mlflow integration fails the second one.
    first = dg.materialize([counted], resources={"tracking": tracking})
    second = dg.materialize([counted], resources={"tracking": tracking})
    assert first.success and second.success
    client = tracking.client()
    runs = client.search_runs([tracking.experiment_id()], f"tags.`{ASSET_TAG}` = 'counted'")
    assert len(runs) == 2
    parents = {run.data.tags[PARENT_TAG] for run in runs}
    assert len(parents) == 2  # one parent per Dagster run
    for parent_id in parents:
        assert client.get_run(parent_id).data.tags["sftkey.pipeline_run"] in (first.run_id, second.run_id)
    assert {run.info.status for run in runs} == {"FINISHED"}
    assert {run.data.metrics["value"] for run in runs} == {7.0}


def test_a_failing_asset_marks_its_run_failed(tracking):
    result = dg.materialize([broken], resources={"tracking": tracking}, raise_on_error=False)
    assert not result.success
    (run,) = tracking.client().search_runs([tracking.experiment_id()], f"tags.`{ASSET_TAG}` = 'broken'")
    assert run.info.status == "FAILED"


def test_unreachable_server_fails_with_what_to_do():
    resource = MlflowResource(tracking_uri=UNREACHABLE, timeout_s=2)
    with pytest.raises(TrackingUnavailable) as error:
        resource.resolve_uri()
    message = str(error.value)
    assert message.startswith(f"MLflow tracking store {UNREACHABLE} did not answer (")
    assert "Nothing was trained" in message and "tracking.fallback_tracking_uri" in message


def test_unreachable_server_falls_back_to_a_local_store_when_configured(tmp_path):
    fallback = f"sqlite:///{tmp_path / 'local.db'}"
    resource = MlflowResource(tracking_uri=UNREACHABLE, fallback_tracking_uri=fallback, timeout_s=2)
    assert resource.resolve_uri() == fallback
    assert resource.client().tracking_uri == fallback


# ---------------------------------------------------------------------------------- stores that cannot be used

class _NotMlflow(http.server.BaseHTTPRequestHandler):
    """A web server that answers, but is not MLflow: HTML for /, 404 for the MLflow REST API or everything."""

    status = 200

    def do_GET(self):
        body = b"<html><body>a wiki</body></html>"
        self.send_response(self.status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(params=[200, 404])
def not_mlflow(request):
    handler = type("Handler", (_NotMlflow,), {"status": request.param})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", request.param
    server.shutdown()
    server.server_close()


def test_a_server_that_answers_but_is_not_mlflow_is_refused(not_mlflow):
    url, status = not_mlflow
    with pytest.raises(TrackingUnavailable) as error:
        MlflowResource(tracking_uri=url, timeout_s=2).resolve_uri()
    what = "text/html, not MLflow's JSON" if status == 200 else "HTTP 404"
    assert str(error.value).startswith(f"MLflow tracking store {url} answered, but not as an MLflow server "
                                       f"(GET /api/2.0/mlflow/experiments/search?max_results=1: {what}). "
                                       "Nothing was trained.")


@pytest.mark.parametrize("path, why", [
    ("/proc/sftkey-nowhere/mlflow.db", "is not writable (/proc/sftkey-nowhere: No such file or directory)"),
    ("/etc/hostname/mlflow/mlflow.db", "is not writable (/etc/hostname/mlflow: Not a directory)"),
])
def test_an_unwritable_sqlite_store_is_refused_at_once(path, why):
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable) as error:
        MlflowResource(tracking_uri=f"sqlite:///{path}").resolve_uri()
    assert time.monotonic() - started < 5
    assert str(error.value).startswith(f"MLflow tracking store sqlite:///{path} {why}; point tracking.tracking_uri "
                                       "at a writable path. Nothing was trained.")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    with pytest.raises(TrackingUnavailable, match="is not writable"):
        MlflowResource(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}").resolve_uri()
    assert list(folder.iterdir()) == []


def test_a_read_only_database_file_is_refused(tmp_path):
    database = tmp_path / "mlflow.db"
    database.write_bytes(b"")
    database.chmod(0o444)
    if os.geteuid() == 0:
        pytest.skip("root opens read-only files for writing")
    with pytest.raises(TrackingUnavailable, match=f"is not writable \\({database}: Permission denied\\)"):
        MlflowResource(tracking_uri=f"sqlite:///{database}").resolve_uri()


def test_a_lock_held_by_another_process_times_out_with_what_to_do(tmp_path, monkeypatch):
    from filelock import FileLock

    import orchestration.tracking as tracking_module

    monkeypatch.setattr(tracking_module, "LOCK_TIMEOUT_S", 0.5)
    database = tmp_path / "mlflow.db"
    with FileLock(str(database) + ".lock"):  # held by this thread while another tries it, as a second process would
        result: list = []
        thread = threading.Thread(target=lambda: result.append(_open_error(f"sqlite:///{database}")))
        thread.start()
        thread.join(10)
    assert result and isinstance(result[0], TrackingUnavailable)
    assert str(result[0]) == (f"MLflow tracking store sqlite:///{database}: {database}.lock stayed locked for 0 s; "
                              "another process is creating the database, or left the lock behind: retry, or delete "
                              f"{database}.lock when no sftkey process runs")


def _open_error(uri: str) -> BaseException | None:
    from orchestration.tracking import open_client

    try:
        open_client(uri)
    except BaseException as error:
        return error
    return None


def test_sftkey_pipeline_with_a_bad_store_prints_one_line_and_writes_nothing(tiny_model_dir, tmp_path, capsys,
                                                                             not_mlflow):
    from sftkey.cli import main
    from tests.orchestration.conftest import smoke_raw, write_config

    url, _ = not_mlflow
    work = tmp_path / "work"
    config = write_config(smoke_raw(tiny_model_dir, work, tracking={"tracking_uri": url}), tmp_path / "p.yaml")
    started = time.monotonic()
    assert main(["pipeline", "--config", str(config)]) == 2
    assert time.monotonic() - started < 20
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"sftkey pipeline: error: MLflow tracking store {url} answered, but not as an MLflow server")
    assert not (work / "store").exists() and not (work / "runs").exists()


# ---------------------------------------------------------------------------------- credentials

@pytest.mark.parametrize("uri, shown", [
    ("http://user:secret@mlflow.example:5000", "http://user:***@mlflow.example:5000"),
    ("https://ghp_token123@mlflow.example/", "https://***@mlflow.example/"),
    ("postgresql://mlflow:pw%40x@db.example:5432/mlflow?sslmode=require",
     "postgresql://mlflow:***@db.example:5432/mlflow?sslmode=require"),
    ("https://mlflow.example/?password=p1&user=u&access_token=t2#x",
     "https://mlflow.example/?password=***&user=u&access_token=***#x"),
    ("sqlite:////home/u/.sftkey-work/mlflow/mlflow.db", "sqlite:////home/u/.sftkey-work/mlflow/mlflow.db"),
    ("http://127.0.0.1:5000/path@v2", "http://127.0.0.1:5000/path@v2"),
    ("failed: http://u:p@h:1 and http://v:q@h:2", "failed: http://u:***@h:1 and http://v:***@h:2"),
])
def test_redact_hides_passwords_and_tokens(uri, shown):
    assert redact(uri) == shown


def test_unreachable_server_message_shows_no_password():
    with pytest.raises(TrackingUnavailable) as error:
        MlflowResource(tracking_uri="http://alice:hunter2@127.0.0.1:9", timeout_s=2).resolve_uri()
    assert "hunter2" not in str(error.value)
    assert str(error.value).startswith("MLflow tracking store http://alice:***@127.0.0.1:9 did not answer (")


class _MlflowWithBasicAuth(http.server.BaseHTTPRequestHandler):
    """Answers the experiments search as MLflow does, for alice:hunter2 only."""

    def do_GET(self):
        ok = self.headers.get("Authorization") == "Basic YWxpY2U6aHVudGVyMg=="  # alice:hunter2
        body = b'{"experiments": []}' if ok else b'{"error_code": "UNAUTHENTICATED"}'
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_credentials_in_the_url_are_sent_as_basic_auth_and_refusal_is_named():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MlflowWithBasicAuth)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        good = f"http://alice:hunter2@127.0.0.1:{port}"
        assert MlflowResource(tracking_uri=good, timeout_s=2).resolve_uri() == good
        with pytest.raises(TrackingUnavailable) as error:
            MlflowResource(tracking_uri=f"http://alice:wrong@127.0.0.1:{port}", timeout_s=2).resolve_uri()
        assert str(error.value).startswith(f"MLflow tracking store http://alice:***@127.0.0.1:{port} refused the "
                                           "request (HTTP 401): set MLFLOW_TRACKING_USERNAME/PASSWORD or TOKEN.")
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_a_real_mlflow_server_passes_the_probe(tmp_path):
    """The other side of the not-MLflow refusals: `mlflow server` on 127.0.0.1 is accepted and takes a run."""
    import socket

    from orchestration.tracking import probe

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                               "--default-artifact-root", str(tmp_path / "artifacts"), "--workers", "1"],
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # as sftkey ui runs it
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # four uvicorn workers once took over 120 s on 2 loaded cores
        while probe(url, 2.0) is not None and time.monotonic() < deadline:
            time.sleep(1)
        assert probe(url, 2.0) is None
        resource = MlflowResource(tracking_uri=url, experiment="served")
        run_id = resource.start_pipeline_run("probe-run")
        resource.end_run(run_id)
        assert resource.client().get_run(run_id).info.status == "FINISHED"
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)


# ---------------------------------------------------------------------------------- MLflow used the standard way

@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> MlflowResource:
    """One store for the tests below: creating a sqlite store runs MLflow's migrations (seconds each)."""
    folder = tmp_path_factory.mktemp("shared-mlflow")
    return MlflowResource(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}", experiment="standard")


def test_runs_carry_mlflow_context_tags_besides_ours(shared):
    import getpass

    result = dg.materialize([counted], resources={"tracking": shared})
    (run,) = shared.client().search_runs([shared.experiment_id()], f"tags.`dagster.run_id` = '{result.run_id}' "
                                         f"and tags.`{ASSET_TAG}` = 'counted'")
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(__file__)).stdout.strip()
    tags = run.data.tags
    assert (tags["mlflow.user"], tags["mlflow.source.type"], tags["mlflow.source.git.commit"]) == (
        getpass.getuser(), "LOCAL", head)
    assert tags["mlflow.source.name"] == sys.argv[0]
    parent = shared.client().get_run(tags[PARENT_TAG]).data.tags
    assert parent["mlflow.source.git.commit"] == head and parent["sftkey.pipeline_run"] == result.run_id


def test_the_experiment_is_marked_as_model_training_and_another_kind_is_kept(shared):
    from orchestration.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING

    client = shared.client()
    assert client.get_experiment(shared.experiment_id()).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    earlier = client.create_experiment("made-before")  # an experiment sftkey did not create
    assert MlflowResource(tracking_uri=shared.tracking_uri, experiment="made-before").experiment_id() == earlier
    assert client.get_experiment(earlier).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    client.set_experiment_tag(earlier, EXPERIMENT_KIND_TAG, "genai_development")
    MlflowResource(tracking_uri=shared.tracking_uri, experiment="made-before").experiment_id()
    assert client.get_experiment(earlier).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_log_input_records_the_data_set_with_its_data_version_as_digest(shared):
    client = shared.client()
    run_id = client.create_run(shared.experiment_id()).info.run_id
    tracker = MlflowTracker(client, run_id)
    version = "3f2a9c" + "0" * 58  # a data version is a sha256 hex; MLflow keeps at most 36 characters of a digest
    tracker.log_input("gsm8k-train", version, "data/gsm8k/train.jsonl@v1.2", "training")
    tracker.log_input("svamp-test", "77aa01", "https://example.org/svamp.jsonl", "evaluation")
    inputs = client.get_run(run_id).inputs.dataset_inputs
    seen = {(i.dataset.name, i.dataset.digest, i.dataset.source_type, json.loads(i.dataset.source).popitem()[1],
             {t.key: t.value for t in i.tags}["mlflow.data.context"]) for i in inputs}
    assert seen == {("gsm8k-train", version[:36], "local", "data/gsm8k/train.jsonl@v1.2", "training"),
                    ("svamp-test", "77aa01", "http", "https://example.org/svamp.jsonl", "evaluation")}


def test_a_logged_model_is_a_bf16_chat_model_that_generates(shared, tiny_model_dir, tmp_path):
    import shutil

    import mlflow
    import pandas as pd
    from safetensors import safe_open

    from sftkey.generate import GenerationConfig, generate
    from sftkey.models import load_model, load_tokenizer
    from sftkey.tokenize import format_prompt

    checkpoint = tmp_path / "step-final"  # a checkpoint: a model folder plus the trainer's resume state
    shutil.copytree(tiny_model_dir, checkpoint)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state_0.pt"):
        (checkpoint / name).write_bytes(b"state")
    (checkpoint / "sftkey.json").write_text(json.dumps({"precision": "bf16"}))  # trained under bf16 autocast
    # scored in bf16 (benchmark.dtype bfloat16): logged in bf16, the dtype the model was scored in
    client = shared.client()
    run_id = client.create_run(shared.experiment_id()).info.run_id
    uri = MlflowTracker(client, run_id).log_model(checkpoint, "sft_tag-seed0", dtype="bfloat16", max_new_tokens=6)
    logged = client.get_logged_model(uri.removeprefix("models:/"))
    assert (logged.name, logged.tags[WEIGHTS_DTYPE_TAG]) == ("sft_tag-seed0", "bfloat16")

    local = mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "logged"))
    files = sorted(os.path.relpath(os.path.join(d, f), local) for d, _, fs in os.walk(local) for f in fs)
    weights = [f for f in files if f.startswith("artifacts/weights/")]
    assert {os.path.basename(f) for f in weights} >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert not [f for f in files if os.path.basename(f) in ("optimizer.pt", "scheduler.pt", "rng_state_0.pt")]
    with safe_open(os.path.join(local, "artifacts/weights/model.safetensors"), "pt") as stored:
        assert {str(stored.get_tensor(k).dtype) for k in stored.keys()} == {"torch.bfloat16"}

    served = mlflow.pyfunc.load_model(uri)
    question = "What is 2+3?"
    tokenizer = load_tokenizer(checkpoint)
    prompt = format_prompt(tokenizer, question)
    model = load_model(os.path.join(local, "artifacts/weights"), dtype="auto")
    (expected,) = generate(model, tokenizer, [("q", prompt)], GenerationConfig(max_new_tokens=6, progress=False))
    assert served.predict([question]) == [expected.output]
    assert expected.output != prompt and not expected.output.startswith(question)
    chat = {"messages": [{"role": "user", "content": question}]}
    assert served.predict([chat, question]) == [expected.output, expected.output]
    assert served.predict(pd.DataFrame({"messages": [chat["messages"]]})) == [expected.output]
