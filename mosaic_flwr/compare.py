"""``mosaic-flwr compare``: several methods x seeds (x alphas) in one invocation.

Every method runs with the same base overrides, so partitions (a function of
data set, partitioner, alpha, clients and seed), models and round budgets are
identical across methods; the command checks that the partitions really are
the same and says so in the report. Results go under one folder:

- ``runs/<method>-alpha<a>-seed<s>/``: each run's own result folder;
- ``comparison.csv``: one row per run;
- ``comparison.md``: mean and sample standard deviation of the final accuracy
  per method and setting, with the per-seed values;
- ``comparison.png``: test accuracy per round, mean over seeds, per method.

A method is a name from :data:`METHODS` (a strategy plus the overrides that
define it, e.g. an ablation) or ``label:key=value key=value`` for one of your own.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import RunConfig
from .results import read_summary, run_status
from .simulation import LocalSuperLink, parse_overrides, resolve_overrides, simulate

#: Named methods: run-config overrides that define each one.
METHODS: dict[str, dict[str, Any]] = {
    "fedavg": {"strategy": "fedavg"},
    "fedprox": {"strategy": "fedprox"},
    "mosaic": {"strategy": "mosaic"},
    "fedgen": {"strategy": "fedgen"},
    "fedftg": {"strategy": "fedftg"},
    "dense": {"strategy": "dense"},
    "feddf": {"strategy": "feddf"},
    "fedcog": {"strategy": "fedcog"},
    "fedlgd": {"strategy": "fedlgd"},
    "spectral-codistillation": {"strategy": "spectral-codistillation"},
    "ditto": {"strategy": "ditto"},
    # FedAvg, then each client fine-tunes the received model on its data (personalised FL's
    # reference row): Spectral Co-Distillation with every term off, nothing kept.
    "fedavg-ft": {"strategy": "spectral-codistillation", "spectral-generic-weight": 0.0,
                  "spectral-personal-weight": 0.0, "spectral-proximal": 0.0,
                  "spectral-keep-personal": False},
    "heterofl": {"strategy": "heterofl"},
    "fedrolex": {"strategy": "fedrolex"},
    # Ablations of Mosaic: each switches one part off.
    "mosaic-no-meta": {"strategy": "mosaic", "mosaic-meta-model": False},
    "mosaic-noise-inputs": {"strategy": "mosaic", "mosaic-generators": False},
    "mosaic-uniform-experts": {"strategy": "mosaic", "mosaic-expert-weighting": "uniform"},
    "mosaic-no-distill": {"strategy": "mosaic", "mosaic-distill-steps": 0},
}

#: What each named method is, for the report.
DESCRIPTIONS = {
    "fedavg": "FedAvg",
    "fedprox": "FedProx",
    "mosaic": "Mosaic (experts + meta model + generators)",
    "fedgen": "FedGen (server feature generator regularises local training)",
    "fedftg": "FedFTG (server fine-tunes the average on generated hard samples, every round)",
    "dense": "DENSE (one-shot: one round of local training, then server synthesis + distillation)",
    "feddf": "FedDF (ensemble distillation every round; inputs per feddf-inputs)",
    "fedcog": "FedCOG (clients synthesise complementary data against the global model)",
    "fedlgd": "FedLGD (clients train on distilled virtual data, anchored by a global virtual set)",
    "spectral-codistillation": "Spectral Co-Distillation (personalised models, co-distilled "
                               "with the generic one through weight spectra)",
    "ditto": "Ditto (personalised models tied to the global one by a proximal term)",
    "fedavg-ft": "FedAvg + local fine-tuning of the received model (personalised reference)",
    "heterofl": "HeteroFL (width sub-models: static slices, averaged slice-wise)",
    "fedrolex": "FedRolex (width sub-models: slices roll one channel per round)",
    "mosaic-no-meta": "Mosaic, meta model off (count-weighted expert ensemble as teacher)",
    "mosaic-noise-inputs": "Mosaic, generators off (Gaussian noise as distillation inputs)",
    "mosaic-uniform-experts": "Mosaic, experts mixed with uniform client weights",
    "mosaic-no-distill": "Mosaic's schedule without distillation (FedAvg + fine-tuning lr)",
}


@dataclass(frozen=True)
class Method:
    """A label and the run-config overrides that define the method."""

    label: str
    overrides: dict[str, Any]


def parse_method(text: str) -> Method:
    """``fedavg`` (a named method) or ``label:key=value key=value`` (your own)."""
    if ":" not in text:
        if text not in METHODS:
            raise ValueError(f"unknown method {text!r}; named methods: {', '.join(METHODS)}, "
                             f"or define one as 'label:strategy=\"...\" key=value'")
        return Method(text, dict(METHODS[text]))
    label, _, spec = text.partition(":")
    label = label.strip()
    if not label or "/" in label:
        raise ValueError(f"method label {label!r} must be a plain name")
    return Method(label, parse_overrides(spec.split()) if spec.strip() else {})


@dataclass
class PlannedRun:
    """One (method, alpha, seed) of a comparison, and what is on disk for it already."""

    method: Method
    alpha: float  # the run's dirichlet-alpha (the base's when no --alphas were given)
    seed: int
    overrides: dict[str, Any]
    run_dir: Path
    #: ``new``; ``completed`` (kept, not run again); ``resume`` (continued from its
    #: newest checkpoint); ``restart`` (stopped before any checkpoint: set aside, run anew).
    state: str = "new"


def plan_comparison(methods: list[Method], seeds: list[int], alphas: list[float | None],
                    base: dict[str, Any], output_dir: Path) -> list[PlannedRun]:
    """Every (alpha, seed, method) run, validated, with what an earlier invocation into
    the same ``output_dir`` left of it.

    Raises :class:`~mosaic_flwr.errors.ConfigError` for a bad config, and
    ``ValueError`` when a run folder there holds a run of other settings (a
    different command into the same folder).
    """
    from .checkpoint import config_difference  # pylint: disable=import-outside-toplevel

    output_dir = output_dir.resolve()
    defaults = RunConfig().to_mapping()
    plan = []
    for alpha in alphas:
        for seed in seeds:
            for method in methods:
                overrides = {**base, **method.overrides, "seed": seed,
                             "output-dir": str(output_dir / "runs"),
                             "run-name": _run_name(method.label, alpha, seed)}
                if alpha is not None:
                    overrides["dirichlet-alpha"] = alpha
                config = resolve_overrides(overrides).to_mapping()
                run = PlannedRun(method, config["dirichlet-alpha"], seed, overrides,
                                 output_dir / "runs" / overrides["run-name"])
                saved = run.run_dir / "config.json"
                if saved.is_file():
                    # A key the saved run lacks came with a later version: it ran with
                    # that key's default (a new method's keys change no other method).
                    differ = config_difference(
                        {**defaults, **json.loads(saved.read_text(encoding="utf-8"))},
                        config, where="there")
                    if differ:
                        raise ValueError(f"{saved} holds a run with other settings ({differ}); "
                                         f"use another --output-dir")
                    run.state = _state_on_disk(run.run_dir)
                plan.append(run)
    return plan


def _state_on_disk(run_dir: Path) -> str:
    """What to do with a run folder an earlier invocation left (see :class:`PlannedRun`)."""
    from .checkpoint import checkpoints  # pylint: disable=import-outside-toplevel

    if run_status(run_dir) == "completed":
        return "completed"
    return "resume" if checkpoints(run_dir) else "restart"


def run_comparison(plan: list[PlannedRun], base: dict[str, Any], output_dir: Path,
                   cpus_per_client: int = 1, gpus_per_client: float = 0.0,
                   ray_address: str = "") -> list[dict[str, Any]]:
    """Run the planned runs and write the report; returns one row per run.

    Runs that completed in an earlier invocation into ``output_dir`` are kept, not
    run again; runs it left stopped continue from their newest checkpoint (or, with
    none, are set aside as ``<name>.stopped-N`` and run anew). So a comparison that
    was killed finishes when the same command is run again.
    ``ray_address`` (``host:port``) runs them on that Ray cluster, see :class:`LocalSuperLink`.
    """
    from .errors import ResumeError  # pylint: disable=import-outside-toplevel
    from .simulation import resume_overrides  # pylint: disable=import-outside-toplevel

    output_dir = output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    methods = list({run.method.label: run.method for run in plan}.values())
    rows: list[dict[str, Any]] = []
    with LocalSuperLink(ray_address=ray_address) as link:
        for run in plan:
            print(f"[compare] {run.method.label} alpha={run.alpha} seed={run.seed}: {run.state}",
                  flush=True)
            overrides = run.overrides
            if run.state == "resume":
                try:
                    overrides = resume_overrides(run.run_dir, {})
                except ResumeError as err:
                    print(f"[compare] cannot resume ({err}); running it anew", flush=True)
                    run.state = "restart"
            if run.state == "restart":
                aside = _set_aside(run.run_dir)
                print(f"[compare] the stopped run's folder is kept as {aside}", flush=True)
            if run.state != "completed":
                simulate(overrides, superlink=link, output_dir=output_dir,
                         cpus_per_client=cpus_per_client, gpus_per_client=gpus_per_client)
            row = _row(run)
            print(f"[compare] -> {row['status']}, final accuracy {row['final_accuracy']}",
                  flush=True)
            rows.append(row)
            write_report(rows, methods, base, output_dir)
    return rows


def _set_aside(run_dir: Path) -> Path:
    """Rename a stopped run's folder to ``<name>.stopped-N`` (nothing is deleted)."""
    n = 1
    while (aside := run_dir.with_name(f"{run_dir.name}.stopped-{n}")).exists():
        n += 1
    run_dir.rename(aside)
    return aside


def _row(run: PlannedRun) -> dict[str, Any]:
    """The report's row of a run, from its ``summary.json``."""
    summary = read_summary(run.run_dir)
    status = {"completed": "finished:completed", "failed": "finished:failed"}.get(
        summary.get("status", ""), "not-finished")
    done = status == "finished:completed"
    # Per-client accuracy: the personalised models where the method keeps them, else the
    # global model, each on its client's own test split.
    personal = ((summary.get("final_personalised_accuracy")
                 or summary.get("final_personal_accuracy") or {}) if done else {})
    return {"method": run.method.label, "alpha": run.alpha, "seed": run.seed, "status": status,
            "final_accuracy": summary["final_accuracy"] if done else None,
            "best_accuracy": summary["best_accuracy"] if done else None,
            "personal_mean": personal.get("mean"), "personal_worst10": personal.get("worst10"),
            "wall_seconds": summary["wall_seconds"] if done else None,
            "run_dir": str(run.run_dir)}


def _run_name(label: str, alpha: float | None, seed: int) -> str:
    return f"{label}-alpha{alpha}-seed{seed}" if alpha is not None else f"{label}-seed{seed}"


def write_report(rows: list[dict[str, Any]], methods: list[Method], base: dict[str, Any],
                 output_dir: Path) -> None:
    """``comparison.csv``, ``comparison.md`` and ``comparison.png`` from the rows so far."""
    with (output_dir / "comparison.csv").open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (output_dir / "comparison.md").write_text(markdown_table(rows, methods, base),
                                              encoding="utf-8")
    plot_comparison(rows, output_dir / "comparison.png")


def summarise(rows: list[dict[str, Any]]) -> dict[tuple[str, Any], dict[str, Any]]:
    """Per (method, alpha): completed finals, their mean and sample std, failures."""
    groups: dict[tuple[str, Any], dict[str, Any]] = defaultdict(
        lambda: {"finals": [], "seeds": [], "failed": 0, "seconds": []})
    for row in rows:
        group = groups[(row["method"], row["alpha"])]
        if row["final_accuracy"] is None:
            group["failed"] += 1
            continue
        group["finals"].append(row["final_accuracy"])
        group["seeds"].append(row["seed"])
        group["seconds"].append(row["wall_seconds"])
    for group in groups.values():
        finals = group["finals"]
        group["mean"] = statistics.mean(finals) if finals else None
        group["std"] = statistics.stdev(finals) if len(finals) > 1 else 0.0 if finals else None
    return dict(groups)


def partitions_identical(rows: list[dict[str, Any]]) -> bool:
    """Whether every run of one (alpha, seed) saw exactly the same client partitions."""
    seen: dict[tuple[Any, int], str] = {}
    for row in rows:
        path = Path(row["run_dir"]) / "partitions.json"
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        key = (row["alpha"], row["seed"])
        if seen.setdefault(key, text) != text:
            return False
    return True


def markdown_table(rows: list[dict[str, Any]], methods: list[Method], base: dict[str, Any]) -> str:
    """The comparison as a Markdown report."""
    groups = summarise(rows)
    alphas = list(dict.fromkeys(row["alpha"] for row in rows))
    setting = resolve_overrides({**base, **methods[0].overrides})
    lines = ["# Comparison", "",
             f"Common run config: `{json.dumps(base, sort_keys=True)}`: {setting.dataset}, "
             f"{setting.partitioner} partitions, {setting.num_clients} clients, "
             f"{setting.num_server_rounds} rounds x {setting.local_epochs} local epochs, "
             f"model {setting.model}, for every method.  ",
             f"Seeds: {sorted({row['seed'] for row in rows})}; partitions identical across "
             f"methods for each seed: {'yes' if partitions_identical(rows) else 'NO'}.", "",
             "| method | alpha | final accuracy (mean ± std) | per seed | runs | mean wall s |",
             "|---|---|---|---|---|---|"]
    for alpha in alphas:
        for method in methods:
            group = groups.get((method.label, alpha))
            if group is None:
                continue
            mean = "n/a" if group["mean"] is None else f"{group['mean']:.4f} ± {group['std']:.4f}"
            per_seed = ", ".join(f"{f:.4f}" for f in group["finals"])
            runs = f"{len(group['finals'])}" + (f" (+{group['failed']} failed)" if group["failed"] else "")
            secs = f"{statistics.mean(group['seconds']):.0f}" if group["seconds"] else "n/a"
            lines.append(f"| {method.label} | {alpha} | {mean} | {per_seed} | {runs} | {secs} |")
    lines += personal_table(rows, methods)
    lines += distillation_table(rows)
    lines += ["", "Methods:", ""]
    for method in methods:
        what = DESCRIPTIONS.get(method.label, "custom")
        lines.append(f"- `{method.label}`: {what}; overrides `{json.dumps(method.overrides)}`")
    return "\n".join(lines) + "\n"


def distillation_rounds(run_dir: str) -> dict[str, Any] | None:
    """A run's distillation round (the metrics line that scored the student before and
    after it, Mosaic's and FedDF's) with the run's final accuracy; None without one."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    step = next((line for line in lines if "student_accuracy_before" in line
                 and "student_accuracy_after" in line), None)
    if step is None:
        return None
    kept = [line["finetune_kept"] for line in lines if "finetune_kept" in line]
    return {**step, "final": lines[-1].get("accuracy"), "finetune_rounds_kept": sum(kept),
            "finetune_rounds": len(kept)}


def personal_table(rows: list[dict[str, Any]], methods: list[Method]) -> list[str]:
    """Markdown lines: each client's accuracy on its own test split (its personalised model
    where the method keeps one, else the final global model; the rows' ``personal_*``),
    the mean and the worst decile, mean ± std over seeds, for the runs that recorded it."""
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("personal_mean") is not None:
            groups[(row["method"], row["alpha"])].append(row)
    if not groups:
        return []

    def spread(values: list[float]) -> str:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.4f} ± {std:.4f}"

    lines = ["", "## Per-client accuracy", "",
             "Each client's accuracy on its own test split (the test images divided among the "
             "clients in their training label proportions): its personalised model where the "
             "method keeps one, else the final global model.", "",
             "| method | alpha | per-client mean | worst decile | runs |", "|---|---|---|---|---|"]
    for alpha in dict.fromkeys(row["alpha"] for row in rows):
        for method in methods:
            found = groups.get((method.label, alpha))
            if found:
                lines.append(f"| {method.label} | {alpha} | "
                             f"{spread([r['personal_mean'] for r in found])} | "
                             f"{spread([r['personal_worst10'] for r in found])} | {len(found)} |")
    return lines


def distillation_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: every completed run's distillation round, on the test split (which
    the server never sees): the student before, the teacher, the student distilled, how
    far along from before to distilled the kept model is (Mosaic's ``distill_share``),
    the model kept, the final model, and the two rules a distillation should keep."""
    found = [(row, step) for row in rows if row["final_accuracy"] is not None
             and (step := distillation_rounds(row["run_dir"])) is not None]
    if not found:
        return []

    def fmt(value: Any) -> str:
        return "" if value is None else f"{value:.4f}"

    lines = ["", "## Distillation rounds", "",
             "Test accuracy of the student before distillation, the teacher, the distilled "
             "student, the model the round kept (`share`: how far it is from the student "
             "before, 0, to the distilled one, 1), and the final model; `after >= before - "
             "0.005` and `final >= after - 0.01` are checked per run. `fine-tuning kept` "
             "counts the fine-tuning rounds whose average the clients preferred.", "",
             "| method | alpha | seed | before | teacher | distilled | share | after | final | "
             "after >= before - 0.005 | final >= after - 0.01 | fine-tuning kept |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, step in found:
        before, after = step["student_accuracy_before"], step["student_accuracy_after"]
        distilled = step.get("student_accuracy_distilled", after)
        kept = (f"{step['finetune_rounds_kept']:.0f} of {step['finetune_rounds']}"
                if step["finetune_rounds"] else "")
        lines.append(
            f"| {row['method']} | {row['alpha']} | {row['seed']} | {fmt(before)} | "
            f"{fmt(step.get('teacher_accuracy'))} | {fmt(distilled)} | "
            f"{fmt(step.get('distill_share'))} | {fmt(after)} | "
            f"{fmt(step['final'])} | {'yes' if after >= before - 0.005 else 'NO'} | "
            f"{'yes' if step['final'] >= after - 0.01 else 'NO'} | {kept} |")
    return lines


def plot_comparison(rows: list[dict[str, Any]], path: Path) -> None:
    """Test accuracy per round, mean over seeds with a ±std band, one panel per alpha."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    from matplotlib.ticker import MaxNLocator  # pylint: disable=import-outside-toplevel

    curves: dict[Any, dict[str, list[list[float]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        metrics = Path(row["run_dir"]) / "metrics.jsonl"
        if row["final_accuracy"] is None or not metrics.is_file():
            continue
        accuracies = [json.loads(line)["accuracy"]
                      for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
        curves[row["alpha"]][row["method"]].append(accuracies)
    if not curves:
        return
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4), squeeze=False)
    for axis, (alpha, by_method) in zip(axes[0], curves.items()):
        for label, runs in by_method.items():
            length = min(len(r) for r in runs)
            means = [statistics.mean(r[i] for r in runs) for i in range(length)]
            spread = [statistics.stdev(r[i] for r in runs) if len(runs) > 1 else 0.0
                      for i in range(length)]
            x = list(range(1, length + 1))
            axis.plot(x, means, marker="o", markersize=3, label=label)
            axis.fill_between(x, [m - s for m, s in zip(means, spread)],
                              [m + s for m, s in zip(means, spread)], alpha=0.15)
        axis.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1),
                 title=f"alpha = {alpha}")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
