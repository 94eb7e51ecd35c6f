from pathlib import Path

from qsmrim.cli import demo
from qsmrim.cli.main import main


def test_demo_runs_the_documented_commands_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "_default_model_installed", lambda: True)
    steps = demo._steps(tmp_path, demo.QUICK, seed=3, device="cpu")
    assert [argv[0] for _, argv in steps] == [
        "simulate", "simulate", "recon", "recon", "train", "predict", "predict", "evaluate"]
    sim_train, sim_test = steps[0][1], steps[1][1]
    assert sim_train[sim_train.index("--seed") + 1] == "3"
    assert sim_test[sim_test.index("--seed") + 1] == "1003"  # a held-out cohort
    evaluate = steps[-1][1]
    i = evaluate.index("--scorers")
    assert evaluate[i + 1:i + 4] == ["cnn", "rule", "default_model_cnn"]
    assert str(tmp_path / "test" / "default_model" / "predictions.tsv") in evaluate
    # recon runs the plan's number of scans at once on the CPU, one at a time on a GPU
    assert steps[2][1][-2:] == ["--jobs", str(demo.QUICK.workers)]
    gpu = demo._steps(tmp_path, demo.QUICK, seed=3, device="cuda")
    assert "--jobs" not in gpu[2][1] and gpu[2][1][-2:] == ["--device", "cuda"]


def test_demo_resumes_from_step_markers(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(demo, "_default_model_installed", lambda: False)
    monkeypatch.setattr("qsmrim.cli.main.main", lambda argv: calls.append(argv[0]) or 0)
    assert demo.run(demo_args(tmp_path)) == 0
    assert calls == ["simulate", "simulate", "recon", "recon", "train", "predict", "evaluate"]
    calls.clear()
    assert demo.run(demo_args(tmp_path)) == 0
    assert calls == []
    assert "done in an earlier run, skipped" in capsys.readouterr().out


def test_demo_stops_at_a_failed_step(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "_default_model_installed", lambda: False)
    monkeypatch.setattr("qsmrim.cli.main.main", lambda argv: 2 if argv[0] == "recon" else 0)
    assert demo.run(demo_args(tmp_path)) == 2
    assert "step 3" in capsys.readouterr().err
    assert not any(Path(tmp_path, ".demo").glob("recon-*.done"))


def test_demo_refuses_a_file_as_out_dir(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["demo", str(f)]) == 2
    assert "not a folder" in capsys.readouterr().err


def demo_args(out):
    import argparse

    return argparse.Namespace(out_dir=str(out), quick=True, seed=0, device="cpu")
