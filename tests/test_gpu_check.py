"""``python -m bench.gpu_check``: without CUDA it runs what it can (environment, correctness on Triton's
interpreter, launch counts) and marks the GPU stages skipped; its GPU stages' code paths run here on the CPU at
tiny sizes, so the command cannot rot between GPU sessions."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.gpu_check import choices, correctness, stages  # noqa: E402
from bench.gpu_check.report import Report  # noqa: E402

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run (CI's); on a GPU run the command itself")


@NO_CUDA
def test_cpu_run_writes_the_report(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path), "--budget-s", "300"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    table = {line.split("|")[1].strip().split(". ", 1)[1]: line.split("|")[2].strip()
             for line in text.splitlines() if line.startswith("| ") and ". " in line.split("|")[1]}
    assert table == {"environment": "pass", "correctness": "pass", "launches": "pass",
                     "seed_job": "skipped: no CUDA", "timings": "skipped: no CUDA", "registers": "skipped: no CUDA"}
    assert "python -m bench.gpu_check --out" in text and torch.__version__ in text
    with open(tmp_path / "correctness.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {r["variant"].split()[0] for r in rows} == {"fp32", "fp16", "fp64"}
    assert {r["check"] for r in rows} >= {"fused_mlp", "fused_mlp_nll", "fused_deep_mlp", "FusedMLP+FusedSGD",
                                         "FusedTrainStep", "split", "hidden split"}
    assert all(r["ok"] == "True" and r["device"] and r["command"] and r["date"] for r in rows)
    with open(tmp_path / "launches.csv", encoding="utf-8") as f:
        launches = {r["what"]: float(r["pyfused_launches"]) for r in csv.DictReader(f)}
    assert launches["FusedTrainStep call"] == 2


def test_a_failed_check_fails_the_stage(tmp_path, monkeypatch):
    """A kernel that is wrong shows as a failed output with its error, and the stage (and the run) fail."""
    monkeypatch.setattr(correctness, "variants", lambda cuda: [correctness.Variant("fp32", (9, 12, 10, 4), True, "relu")])
    real = correctness.pyfused.fused_mlp
    monkeypatch.setattr(correctness.pyfused, "fused_mlp", lambda *a, **k: real(*a, **k) * 1.001)
    report = Report(tmp_path, "test", 100)
    correctness.stage_correctness(report, torch.device("cpu"))
    assert report.stages["correctness"][0] == "fail"
    assert "Failures:" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_gpu_stages_code_paths_on_the_cpu(tmp_path, monkeypatch):
    """The timing and seed-job stages at tiny sizes on the CPU (kernels on the interpreter): rows for every
    implementation and launch, the report written."""
    monkeypatch.setenv("PYFUSED_BACKEND", "triton")
    report = Report(tmp_path, "test", 300)
    cpu = torch.device("cpu")
    from bench import model  # a stand-in prediction for these sizes: the columns beside the measurements

    monkeypatch.setattr(model, "N_IN", 32)
    monkeypatch.setattr(model, "committed", lambda name: {(40, 16, "fp32"): (1.0, 2.0, 3.0)})
    from bench import gpu_compile as gc

    fashion, regression, small = gc.COURSE  # the course's programs at tiny sizes, one stand-in prediction
    monkeypatch.setattr(model, "committed_course", lambda name: {(regression, "adam", 24, "fp32"): 5.0})
    shapes = {fashion: (8, 32, 16, 10, ()), regression: (6, 40, 12, 4, ()), small: (6, 20, 13, 3, (8,))}
    stages.stage_timings(report, cpu, seed=dict(impls=("eager", "pyfused", "fused_train_step"), batch=8,
                                                   dims=(32, 16, 10)),
                            launches=dict(batches=(8, 40), dtypes=("fp32",), dims=(32, 16, 10)),
                            wide=dict(batches=(8,), dtypes=("fp32",), dims=(32, 48, 10)),
                            course=dict(shapes=shapes, large=24, modes=("fp32",)),
                            choices=(choices.Choice("tiny", 40, (64, 96, 5), "fp32", choices.ONE_SLICE, (2.0, 1.0)),))
    assert report.stages["timings"][0] == "pass", report.stages["timings"]
    (chosen,) = report.csv["timings_choices"]  # the launcher's two slices of 64 against one of 128, same outputs
    assert chosen["status"] == "ok" and chosen["predicted"] == "2.0 → 1.0"
    assert float(chosen["launcher_us"]) > 0 and float(chosen["earlier_us"]) > 0
    course = report.csv["timings_course"]
    assert {(r["program"], r["optimizer"], r["batch"]) for r in course} == {
        (p, o, b) for p, o in ((fashion, "sgd"), (regression, "sgd"), (regression, "adam"), (small, "sgd"))
        for b in (shapes[p][0], 24)}
    assert all(float(r["median_us"]) > 0 for r in course)
    guessed = [r for r in course if "predicted_us" in r]
    assert len(guessed) == 1 and guessed[0]["predicted_us"] == "5.00"
    seed = {r["impl"]: r for r in report.csv["timings_seed_step"]}
    assert set(seed) == {"eager", "pyfused", "fused_train_step"} and all(r["status"] == "ok" for r in seed.values())
    launches = report.csv["timings_launches"]
    assert {(r["batch"], r["what"]) for r in launches} >= {
        (8, "FusedTrainStep launch 1: rows_kernel"), (40, "FusedTrainStep launch 2: grads_kernel"),
        (8, "module step launch 4: optimizer_kernel"), (40, "FusedTrainStep (whole call)")}
    assert all(float(r["median_us"]) > 0 for r in launches)
    assert {(r["batch"], r["hidden"]) for r in launches} == {(8, 16), (40, 16), (8, 48)}  # and the wide point
    guessed = {r["what"]: r for r in launches if "predicted_us" in r}
    assert {r["batch"] for r in guessed.values()} == {40} and set(guessed) == {
        "FusedTrainStep launch 1: rows_kernel", "FusedTrainStep launch 2: grads_kernel", "FusedTrainStep (whole call)"}
    whole = guessed["FusedTrainStep (whole call)"]
    assert whole["predicted_us"] == "3.00" and float(whole["measured_over_predicted"]) == pytest.approx(
        float(whole["median_us"]) / 3.0, rel=1e-2)
    monkeypatch.setenv("PYFUSED_BACKEND", "auto")
    stages.stage_seed_job(report, cpu, epochs=1, extra=("--limit", "600"))
    assert report.stages["seed_job"][0] == "pass", report.stages["seed_job"]
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "Seed step" in text and "speed ratio" in text and "The course's programs" in text


def test_the_committed_report_of_the_running_triton(monkeypatch):
    """gpu_check compares with the report of its own Triton minor version where one is committed (the GPU
    machine's 3.6), else with the development stack's."""
    import triton

    folder = stages.ROOT / "bench" / "results" / "compile"
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    assert stages.committed_report_path("sm_90") == folder / "triton-3.6" / "sm_90.md"
    assert stages.committed_report("sm_90")[("step_rows", "fp32", "no")][0].isdigit()
    monkeypatch.setattr(triton, "__version__", "9.9.0")
    assert stages.committed_report_path("sm_90") == folder / "sm_90.md"


def test_committed_compile_report_parses():
    table = stages.committed_report("sm_90")
    for kernel in ("forward_loss", "rows_loss", "grads", "sgd", "step_rows", "step_grads"):
        regs, spill = table[(kernel, "fp32", "no")]
        assert int(regs) > 0 and spill.count("/") == 1


def test_each_config_choice_times_two_different_launches():
    """The choices gpu_check times are launches whose launcher tiles differ from the earlier ones (else the side by
    side would compare a launch with itself): the seed's fp32 rows take two slices of 64 where they took 128."""
    from pyfused.kernels import rows as R

    for choice in choices.CHOICES:
        now = R.rows_config(choice.batch, choice.widths, choices.DTYPES[choice.mode], forward=True, backward=True,
                            loss="class")
        assert now != choice.earlier and (now["BLOCK_H"], choice.earlier["BLOCK_H"]) == (64, 128), choice
