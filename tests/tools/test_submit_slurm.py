"""tools/submit_slurm.py with submitit's LocalExecutor (no SLURM cluster here): a tiny training
runs as a submitit job, and the resubmission that submitit makes on pre-emption resumes it."""

import os

import pytest
from test_lazyconfig_train_net import CONFIG, REPO, TINY, checkpoint, data  # noqa: F401

from dino_d2.cli.submit_slurm import submit
from dino_d2.cli.train_net import invoke_main
from dino_d2.engine.slurm import TrainingJob

submitit = pytest.importorskip("submitit")


def test_the_training_script_needs_a_config(tmp_path, capsys):
    with pytest.raises(SystemExit):
        submit(["--cluster", "local", "--log-dir", str(tmp_path), "train.max_iter=2"])
    assert "the training script needs --config-file" in capsys.readouterr().err


def test_a_local_job_trains_and_its_requeue_resumes(data, tmp_path, monkeypatch):  # noqa: F811
    # The job's process imports this checkout's dino_d2.
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    output_dir = str(tmp_path / "out")
    train_argv = ["--config-file", CONFIG, "train.max_iter=2", *TINY, *data]
    train_argv += [
        f"train.output_dir={output_dir}",
        f"dataloader.evaluator.output_dir={output_dir}",
    ]
    options = ["--cluster", "local", "--gpus-per-node", "0", "--cpus-per-task", "1"]
    job, _ = submit([*options, "--time", "10", "--log-dir", str(tmp_path / "logs"), *train_argv])
    job.result()
    assert checkpoint(output_dir, "model_final.pth")["iteration"] == 1

    # What submitit runs when SLURM pre-empts the job or its time runs out.
    requeue = job.submission().function.checkpoint()
    assert isinstance(requeue.function, TrainingJob)
    assert requeue.function.requeued and requeue.function.main is invoke_main
    assert requeue.function.argv == train_argv
    executor = submitit.LocalExecutor(folder=str(tmp_path / "logs"))
    executor.update_parameters(timeout_min=10)
    executor.submit(requeue.function).result()
    with open(os.path.join(output_dir, "log.txt")) as f:
        log = f.read()
    assert log.count("A restarted job: resuming from the last checkpoint") == 1
    assert "Starting training from iteration 2" in log
