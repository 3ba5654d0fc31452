"""Every command that README.md and docs/*.md tell a user to run is run, in small form, by a
named test, with the shipped config it names; or is listed here with the reason no test can run
it. A command added to the docs without either fails ``test_every_documented_command``. Links
between the docs resolve, and the README stays a short guide.
"""
from __future__ import annotations

import importlib
import re
import shlex

import pytest

from conftest import REPO

# The README and every page under docs/ (a new page is covered without being listed here).
DOCS = ("README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")))
README_MAX_LINES = 300  # a user's guide; measurements and design notes live in docs/

# (entry point, config it names) -> the tests that run it in small form. The entry point is the
# script (train.py, bench/x.py), the module of `python -m`, or the make target.
RUN_BY = {
    ("make demo", ""): ["test_demo.py::test_make_demo_trains_the_synthetic_config"],
    ("train.py", ""): ["test_train.py::test_loss_decreases_and_metrics_are_complete"],
    ("train.py", "configs/synthetic.py"): [
        "test_configs.py::test_training_config_trains_and_evaluates"],
    ("train.py", "configs/fib25.py"): ["test_configs.py::test_training_config_trains_and_evaluates"],
    ("train.py", "configs/gala.py"): ["test_configs.py::test_training_config_trains_and_evaluates"],
    ("train.py", "configs/gala_finetune.py"): [
        "test_configs.py::test_training_config_trains_and_evaluates"],
    ("train.py", "configs/fib25_finetune.py"): [
        "test_configs.py::test_training_config_trains_and_evaluates"],
    ("train.py", "configs/fib25_small.py"): [
        "test_configs.py::test_training_config_trains_and_evaluates"],
    ("infer.py", "configs/gala_infer.py"): ["test_configs.py::test_inference_config_segments_a_box"],
    ("infer.py", "configs/synthetic_infer.py"): [
        "test_configs.py::test_inference_config_segments_a_box",
        "test_train.py::test_training_workdir_loads_for_inference"],
    ("infer.py", "configs/fib25_infer.py"): [
        "test_inference_fib25.py::test_readme_infer_then_evaluate_c64_matches_tensorflow",
        "test_tiling.py::test_tiled_run_one_and_two_ranks_and_resume",
        "test_configs.py::test_inference_config_segments_a_box"],
    ("ffn_jax.plot", ""): ["test_training_eval.py::test_plot_overlays_runs_and_rejects_non_workdirs"],
    ("ffn_jax.evaluate", ""): [
        "test_inference_fib25.py::test_readme_infer_then_evaluate_c64_matches_tensorflow",
        "test_evaluation.py::test_official_google_segmentation_on_c64"],
    ("ffn_jax.calibrate", ""): [
        "test_inference_cli.py::"
        "test_calibrated_flood_settings_round_trip_through_the_checkpoint_into_infer"],
    ("ffn_jax.data.synthetic", ""): ["test_demo.py::test_make_demo_trains_the_synthetic_config"],
    ("ffn_jax.import_tf_checkpoint", ""): [
        "test_inference_fib25.py::test_readme_infer_then_evaluate_c64_matches_tensorflow"],
    ("bench/baseline_watershed.py", ""): ["test_bench.py::test_watershed_baseline_cli_on_gala"],
    ("bench/conv_stack.py", ""): ["test_bench.py::test_conv_stack_workers_end_to_end"],
    ("bench/train_throughput.py", "configs/fib25.py"): [
        "test_bench.py::test_train_throughput_on_the_documented_configs"],
    ("bench/train_throughput.py", "configs/synthetic.py"): [
        "test_bench.py::test_train_throughput_on_the_documented_configs"],
    ("bench/scaling.py", ""): ["test_bench.py::test_scaling_quick_two_ranks_end_to_end"],
    ("bench/time_to_quality.py", ""): [
        "test_bench.py::test_time_to_quality_reads_runs_and_projects_hours_by_node_count"],
    ("bench/scaling_model.py", ""): ["test_bench.py::test_scaling_model_measures_and_projects"],
    # These two run on configs/tiny.py (the synthetic config shrunk): a study of 4 or 2
    # training runs on fib25 or synthetic does not fit the suite's time.
    ("bench/lr_batch_study.py", ""): ["test_bench.py::test_lr_batch_study_end_to_end"],
    ("bench/lr_batch_study.py", "configs/synthetic.py"): [
        "test_bench.py::test_lr_batch_study_end_to_end"],
    ("bench/precision_study.py", "configs/fib25.py"): ["test_bench.py::test_precision_study_tiny"],
    ("bench/inference.py", ""): ["test_bench.py::test_inference_bench_on_c64"],
    ("bench/stitch_study.py", ""): [
        "test_tiling.py::test_stitch_study_restitches_the_kept_tiles_with_each_rule"],
    ("bench/border_study.py", ""): [
        "test_bench.py::test_border_study_scores_shells_by_distance_to_the_block_faces"],
    ("bench/eta_accuracy.py", ""): [
        "test_bench.py::test_eta_accuracy_records_an_infer_run_and_scores_each_estimator"],
    ("bench/eta_accuracy.py", "configs/fib25_infer.py"): [
        "test_bench.py::test_eta_accuracy_records_an_infer_run_and_scores_each_estimator"],
    ("bench/seed_halo.py", ""): [
        "test_bench.py::test_seed_halo_counts_the_tiles_whose_seeds_equal_one_keyed_pass"],
    # On a GPU it runs at full size; the test runs every step at tiny sizes (--dry) on the CPU.
    ("bench/gpu_check.py", ""): ["test_bench.py::test_gpu_check_runs_every_step_in_dry_mode"],
}
# Entry points no test runs as documented, and why.
NOT_RUN = {
    "make test": "the suite itself",
    "make test-fast": "the suite itself (its fast tier)",
    "pytest": "the suite itself",
    "sbatch": "needs a Slurm cluster; slurm/*.sbatch call the same train.py / infer.py",
    "tensorboard": "TensorBoard is not a dependency; test_training_eval checks the event files",
    "pip": "an install step (make setup runs the README's)",
}


def documented_commands() -> list[tuple[str, str]]:
  """(file, command) for every line of a bash block in DOCS that runs something."""
  out = []
  for name in DOCS:
    text = (REPO / name).read_text()
    for lang, block in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
      if lang not in ("bash", "sh", ""):
        continue
      for line in block.replace("\\\n", " ").splitlines():
        line = line.strip().removeprefix("$ ")
        try:
          argv = shlex.split(line, comments=True)
        except ValueError:
          continue
        if argv and _entry(argv) is not None:
          out.append((name, line))
  return out


def _entry(argv: list[str]) -> tuple[str, str] | None:
  """(entry point, config) of a command line; None for output, paths and other non-commands."""
  while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):  # VAR=value prefixes
    argv = argv[1:]
  if argv and argv[0] == "mpirun":
    argv = argv[next((i for i, a in enumerate(argv) if a in ("python", "python3")), len(argv)):]
  if not argv:
    return None
  config = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), "")
  if argv[0] in ("python", "python3") and len(argv) > 1:
    if argv[1] == "-m":
      return (argv[2], "") if argv[2] != "pytest" else ("pytest", "")
    return argv[1], config
  if argv[0] == "make" and len(argv) > 1:
    return f"make {argv[1]}", ""
  if argv[0] in ("sbatch", "tensorboard", "pip"):
    return argv[0], ""
  return None


def test_the_parser_finds_the_documented_commands():
  commands = documented_commands()
  assert len(commands) > 40
  keys = {_entry(shlex.split(c, comments=True)) for _, c in commands}
  assert {("make demo", ""), ("train.py", "configs/gala.py"), ("bench/scaling.py", ""),
          ("ffn_jax.evaluate", ""), ("infer.py", "configs/fib25_infer.py")} <= keys
  assert _entry(shlex.split("OMP_NUM_THREADS=1 mpirun -n 2 -bind-to core:1 python infer.py "
                            "--config configs/fib25_infer.py --workdir w")) == (
                                "infer.py", "configs/fib25_infer.py")
  assert _entry(["config", "configs/fib25.py:", "depth", "12"]) is None  # printed output


def test_every_documented_command_is_run_by_a_test_or_says_why_not():
  missing = sorted({(f, c) for f, c in documented_commands()
                    if _entry(shlex.split(c, comments=True)) not in RUN_BY
                    and _entry(shlex.split(c, comments=True))[0] not in NOT_RUN})
  assert not missing, "documented commands no test runs (add a test to RUN_BY):\n" + "\n".join(
      f"{f}: {c}" for f, c in missing)


@pytest.mark.parametrize("test", sorted({t for tests in RUN_BY.values() for t in tests}))
def test_the_named_tests_exist(test):
  module, name = test.split("::")
  assert hasattr(importlib.import_module(module.removesuffix(".py")), name), test


def test_docs_cover_the_readme_and_every_page_under_docs():
  assert DOCS[0] == "README.md"
  assert {"docs/benchmarks.md", "docs/quality.md", "docs/tiling.md"} <= set(DOCS)


def test_the_readme_stays_a_short_guide():
  lines = (REPO / "README.md").read_text().count("\n")
  assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move details to docs/"


def _anchor(heading: str) -> str:
  """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to '-'."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_docs_resolve():
  broken = []
  for name in DOCS:
    text = (REPO / name).read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
      if re.match(r"[a-z]+://", target):
        continue
      path, _, anchor = target.partition("#")
      file = ((REPO / name).parent / path).resolve() if path else REPO / name
      if not file.exists():
        broken.append(f"{name}: {target} (no such file)")
      elif anchor and file.suffix == ".md":
        headings = re.findall(r"^#+ (.*)$", file.read_text(), re.M)
        if anchor not in {_anchor(h) for h in headings}:
          broken.append(f"{name}: {target} (no such heading)")
  assert not broken, "\n".join(broken)
