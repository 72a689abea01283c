"""maxentctl against a live server."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import threading

from maxent_client import MaxEntClient
from maxent_client.cli import main


def ctl(server, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(["--target", server.target, *argv], out=out)
    return code, out.getvalue()


def test_health_via_console_script(server):
    result = subprocess.run([sys.executable, "-m", "maxent_client.cli", "--target", server.target, "health"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "SERVING"


def test_health_of_a_dead_server_fails():
    code, text = ctl(type("S", (), {"target": "127.0.0.1:1"})(), "--timeout", "2", "health")
    assert code == 1 and "UNAVAILABLE" in text


def test_runs_create_show_list_delete(server, run_id):
    code, text = ctl(server, "runs", "create", run_id, "--set", "tau=0.4", "--set", "beta=0.02",
                     "--set", "denominator=tau", "--set", "target_entropy=1.1")
    assert code == 0
    created = json.loads(text)
    assert created["config"]["denominator"] == "TAU" and created["state"]["tau"] == 0.4
    code, text = ctl(server, "runs", "show", run_id)
    assert code == 0 and json.loads(text)["config"]["target_entropy"] == 1.1
    code, text = ctl(server, "runs", "list")
    assert code == 0 and text.splitlines()[0].split()[:3] == ["RUN", "TAU", "BETA"]
    assert any(line.startswith(run_id + " ") for line in text.splitlines())
    assert ctl(server, "runs", "delete", run_id)[0] == 0
    code, _ = ctl(server, "runs", "show", run_id)
    assert code == 2


def test_bad_config_names_the_field(server, run_id, capsys):
    code, _ = ctl(server, "runs", "create", run_id, "--set", "tau=-1")
    assert code == 2
    assert "config.tau" in capsys.readouterr().err


def test_export_import_round_trip(server, client, run_id, tmp_path):
    ctl(server, "runs", "create", run_id, "--set", "tau=0.5", "--set", "beta=0.1", "--set", "target_entropy=1.0",
        "--set", "tau_lr=0.3")
    client.update_controller(run_id, global_step=1, weight_entropy=0.2)
    exported = tmp_path / "run.json"
    assert ctl(server, "export", run_id, "-o", str(exported))[0] == 0
    data = json.loads(exported.read_text())
    assert data["state"]["version"] == 1
    assert ctl(server, "import", str(exported), "--run-id", run_id + "-copy")[0] == 0
    copy = client.get_run(run_id + "-copy")
    assert copy.state.tau == data["state"]["tau"] and copy.config.tau_lr == 0.3

    seed_file = tmp_path / "controller.json"
    assert ctl(server, "export", run_id, "--format", "seed", "-o", str(seed_file))[0] == 0
    seed = json.loads(seed_file.read_text())
    assert set(seed) == {"beta", "tau", "tau_log", "tau_entropy_ema"}
    assert seed["tau"] == data["state"]["tau"] and math.isclose(seed["tau_entropy_ema"], 0.2)


def test_watch_prints_changes(server, run_id):
    with MaxEntClient(server.target) as client:
        client.create_run(run_id, __import__("maxent_client").WeightingConfig(tau=0.5, beta=0.1))
        out = io.StringIO()
        updater = threading.Timer(0.5, lambda: client.update_controller(run_id, global_step=7, measured_kl=0.2))
        updater.start()
        code = main(["--target", server.target, "watch", run_id, "--interval", "0.1", "--count", "2"], out=out)
        updater.join()
    lines = out.getvalue().splitlines()
    assert code == 0 and lines[0].split()[:2] == ["VERSION", "STEP"] and len(lines) == 3
    assert lines[1].split()[0] == "0" and lines[2].split()[:2] == ["1", "7"]
