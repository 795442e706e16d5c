"""Secrets stay out: a tracking URI with credentials is refused before anything is created, and
URLs are redacted in every exception text that is logged (hpc_mim/redact.py): the tracking
spool's notes, the launcher's status record and log line, the report's failure section."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from hpc_mim.config import ConfigError, load_config
from hpc_mim.distributed.env import free_port
from hpc_mim.redact import redact

SECRET = "s3cretPW"


@pytest.mark.parametrize("uri", [f"http://alice:{SECRET}@mlflow.example.org:5000",
                                 f"postgresql://mlflow:{SECRET}@db.example.org/mlflow",
                                 f"https://{SECRET}@mlflow.example.org",
                                 f"http://mlflow.example.org:5000?token={SECRET}"])
def test_a_tracking_uri_with_credentials_is_refused_without_echoing_them(uri):
    with pytest.raises(ConfigError) as e:
        load_config("mae", "smoke", overrides=[f"tracking.uri={uri}"])
    text = str(e.value)
    assert text.startswith("tracking.uri: ") and SECRET not in text
    assert "MLFLOW_TRACKING_USERNAME" in text and "MLFLOW_TRACKING_PASSWORD" in text
    assert "MLFLOW_TRACKING_TOKEN" in text


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "postgresql://mlflow@db.example.org/mlflow",
                                 "sqlite:////shared/a@b/mlflow.db", ""])
def test_a_tracking_uri_without_secrets_is_accepted(uri):
    """A database user name alone is no secret (its password is in ~/.pgpass); an "@" in a
    sqlite path is no userinfo."""
    assert load_config("mae", "smoke", overrides=[f"tracking.uri={uri}"]).tracking.uri == uri


@pytest.mark.parametrize("flags", [("--tracking-uri", f"http://alice:{SECRET}@127.0.0.1:5000"),
                                   ("--set", f"tracking.uri=https://{SECRET}@127.0.0.1")])
def test_submit_refuses_credentials_in_the_uri_before_creating_anything(tmp_path, flags):
    r = subprocess.run([sys.executable, str(REPO / "jobs" / "submit.py"), "--method", "mae", "--preset", "smoke",
                        "--set", f"runs_root={tmp_path}", *flags, "--dry-run"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "error: tracking.uri:" in r.stderr and "MLFLOW_TRACKING_PASSWORD" in r.stderr
    assert SECRET not in r.stdout + r.stderr
    assert not any(tmp_path.iterdir())                  # no run directory, no store


def test_redact_hides_userinfo_query_secrets_and_authorization_values():
    text = ("API request to http://alice:pa@ss@host:5000/api/2.0/mlflow/runs/get?run_id=ab12 failed; "
            "upload to https://bucket.s3.amazonaws.com/x?X-Amz-Credential=AKIA1&X-Amz-Signature=f00d&part=2 "
            "(Authorization: Bearer eyJhbGciOiJIUzI1NiJ9) via postgresql://u:p@db/mlflow, ftp://tok@h")
    assert redact(text) == (
        "API request to http://***@host:5000/api/2.0/mlflow/runs/get?run_id=ab12 failed; "
        "upload to https://bucket.s3.amazonaws.com/x?X-Amz-Credential=***&X-Amz-Signature=***&part=2 "
        "(Authorization: Bearer ***) via postgresql://***@db/mlflow, ftp://***@h")
    plain = "sqlite:////runs/a@b/mlflow.db and /runs/x@y and http://host:5000/api?run_id=1"
    assert redact(plain) == plain


def test_an_unreachable_server_note_does_not_show_the_password(tmp_path, capsys):
    """MLflow's own exception text names the URL, credentials included; the spool's note does
    not (a URI from an old config.yaml or tracking.json, written before the refusal)."""
    from hpc_mim.tracking import MLflowLogger
    uri = f"http://alice:{SECRET}@127.0.0.1:{free_port()}"         # nobody listens there
    logger = MLflowLogger(uri, "0" * 32, spool=tmp_path / "spool" / "r.jsonl", retry_s=3600)
    logger.set_tags({"a": 1})
    err = capsys.readouterr().err
    assert "unreachable" in err and "http://***@127.0.0.1" in err and SECRET not in err
    assert logger.pending() == 1


ENTRY = f"""
def main():
    raise RuntimeError("API request to http://alice:{SECRET}@mlflow:5000/api/2.0/mlflow/runs/log-batch "
                       "failed with exception ConnectionError")
"""
RUN = """
import sys
from jobs.launcher import run_entry
run_entry("probe_entry:main", {}, status_file=sys.argv[1])
"""


def test_the_launcher_redacts_the_error_in_its_status_record_and_log_line(tmp_path):
    (tmp_path / "probe_entry.py").write_text(textwrap.dedent(ENTRY))
    status = tmp_path / "status.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{tmp_path}"
    r = subprocess.run([sys.executable, "-c", RUN, str(status)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    record = json.loads(status.read_text())
    assert record["state"] == "FAILED"
    assert record["error"] == ("RuntimeError: API request to http://***@mlflow:5000/api/2.0/mlflow/runs/"
                               "log-batch failed with exception ConnectionError")
    assert "http://***@mlflow:5000" in record["traceback"] and SECRET not in record["traceback"]
    line = next(x for x in r.stdout.splitlines() if x.startswith("[launcher] rank 0: failed:"))
    assert "http://***@mlflow" in line and SECRET not in r.stdout


def test_the_reports_failure_section_shows_the_error_redacted(tmp_path):
    from evaluation.report_data import read_run
    from hpc_mim.rundir import RunDir
    run = RunDir(tmp_path / "run").create()
    run.write_tracking({"uri": f"http://alice:{SECRET}@127.0.0.1:{free_port()}",
                        "experiment_id": "1", "run_id": "0" * 32})
    result = read_run(run.root, "cell", "mae")
    assert result.error.startswith("MlflowException: API request to http://***@127.0.0.1:")
    assert SECRET not in result.error
