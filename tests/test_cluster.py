"""`refcache verify --cluster`: the campaign's tasks on a real Dask cluster started by the test.

A local cluster of two worker processes (a scheduler, nannies, workers: the same pieces as a
multi-machine cluster, on one host). The seeded bug is found on a worker; its report and repro
file must land in the run's folder, beside the proofs and the clean slices of the other worker."""

from __future__ import annotations

import json

import pytest

from campaign.cli import main

pytest.importorskip("distributed", reason="the cluster extra is not installed (pip install -e '.[cluster]')")

BUG = "class3_resolve_mutates_record"  # found in well under a second


def test_verify_on_a_local_dask_cluster_merges_one_report(tmp_path):
    code = main(["verify", "--budget", "45", "--bugs", BUG, "--nodes", "2", "--no-crosshair",
                 "--cluster", "local:2", "--out", str(tmp_path), "--seed", "4"])
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["where"].startswith("Dask cluster at tcp://") and "2 workers" in s["where"] and s["jobs"] == 2, s["where"]
    assert code == 3 and s["verdict"]["not_done"] == ["CrossHair contracts not checked (--no-crosshair)"], s["verdict"]
    assert not s["task_errors"]
    assert s["proofs"] and all(p["status"] == "proved" for p in s["proofs"])
    (b,) = s["bugs"]
    assert b["detected"] and (tmp_path / b["report"]).exists() and (tmp_path / b["repro"]).exists()
    assert "def test_repro" in (tmp_path / b["repro"]).read_text()
    assert s["clean"]["steps"] > 0 and s["clean"]["violations"] == 0
    assert s["coverage"]["branches"]["total"]["branches_covered"] > 0  # a local cluster shares this disk


def test_unreachable_scheduler_is_a_usage_error_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["verify", "--budget", "5", "--cluster", "tcp://127.0.0.1:9", "--out", str(out)])
    assert e.value.code == 2 and "no Dask scheduler reachable" in capsys.readouterr().err
    assert not out.exists()
