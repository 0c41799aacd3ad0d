"""Paired comparisons between two runs (``python -m bundle compare A B``).

:func:`compare` pairs two runs' ``metrics.csv`` by case and region and reports, per metric and region,
the mean difference B - A with its bootstrap confidence interval, Wilcoxon's signed-rank and the paired
t-test's p-values, and a verdict.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import stats

from bundle.errors import OptionError
from bundle.evaluation.files import (
    read_metrics_csv,
    write_metrics_table,
)
from bundle.evaluation.reports import LOWER_IS_BETTER, SUMMARY_METRICS
from bundle.options import check_options, closest


def compare(
    run_a_csv: str | Path,
    run_b_csv: str | Path,
    metrics: Sequence[str] | None = None,
    n_bootstrap: int = 10000,
    seed: int = 0,
    alpha: float = 0.05,
    output_csv: str | Path | None = None,
    verbose: bool = True,
) -> list[dict]:
    """Paired comparison of two runs' ``metrics.csv`` (B minus A), per region and metric.

    Cases are paired by case id; both files must hold the same cases and regions (a ``ValueError`` names
    the file and the cases that differ). Each result row has ``region``, ``metric``, ``n``, ``mean_a``,
    ``mean_b``, ``mean_diff`` (B - A), ``ci_low`` / ``ci_high`` (percentile bootstrap 95 % CI of the mean
    difference, ``n_bootstrap`` resamples of the cases, seeded: :func:`bootstrap_ci`), ``p_wilcoxon``
    (two-sided Wilcoxon signed-rank) and ``p_ttest`` (two-sided paired t-test), and ``verdict``: B is
    called better or worse only if the Wilcoxon p-value is below ``alpha`` *and* the bootstrap CI
    excludes 0; otherwise "no significant difference". Identical runs give mean difference 0 and p-values of 1.
    """
    # the numbers before the files: compare(n_bootstrap=0) is one sentence naming the option, as on the command line
    numbers = check_options(n_bootstrap=n_bootstrap, seed=seed, alpha=alpha)
    n_bootstrap, seed, alpha = numbers["n_bootstrap"], numbers["seed"], numbers["alpha"]
    a, b = read_metrics_csv(run_a_csv), read_metrics_csv(run_b_csv)
    for rows, path in ((a, run_a_csv), (b, run_b_csv)):
        if not rows:
            raise ValueError(f"{path}: the metrics table has no rows")
    index_a, index_b = _index_rows(a, run_a_csv), _index_rows(b, run_b_csv)
    only_a = sorted({c for c, _ in index_a} - {c for c, _ in index_b})
    only_b = sorted({c for c, _ in index_b} - {c for c, _ in index_a})
    if only_a:
        raise ValueError(f"{run_b_csv}: missing case(s) present in {run_a_csv}: {', '.join(only_a)}")
    if only_b:
        raise ValueError(f"{run_a_csv}: missing case(s) present in {run_b_csv}: {', '.join(only_b)}")
    if set(index_a) != set(index_b):
        diff = sorted(set(index_a) ^ set(index_b))
        raise ValueError(f"{run_a_csv} and {run_b_csv}: regions differ for (case, region) {diff[:5]}")
    cases = sorted({c for c, _ in index_a})
    regions = list(dict.fromkeys(r["region"] for r in a))
    metrics = _metrics_of_both(metrics, a[0], b[0], run_a_csv, run_b_csv)
    results = []
    for region in regions:
        for metric in metrics:
            va = np.array([index_a[(c, region)][metric] for c in cases], dtype=float)
            vb = np.array([index_b[(c, region)][metric] for c in cases], dtype=float)
            diff = vb - va
            ci_low, ci_high = bootstrap_ci(diff, n_bootstrap, seed)
            p_w, p_t = _paired_p_values(diff)
            results.append(
                {
                    "region": region,
                    "metric": metric,
                    "n": len(cases),
                    "mean_a": float(va.mean()),
                    "mean_b": float(vb.mean()),
                    "mean_diff": float(diff.mean()),
                    "ci_low": ci_low,
                    "ci_high": ci_high,
                    "p_wilcoxon": p_w,
                    "p_ttest": p_t,
                    "verdict": _verdict(metric, float(diff.mean()), ci_low, ci_high, p_w, alpha),
                }
            )
    if output_csv is not None:
        write_metrics_table(results, output_csv)
    if verbose:
        print(format_comparison(results))
    return results


def bootstrap_ci(diff: np.ndarray, n_bootstrap: int = 10000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95 % CI of the mean of paired differences: :func:`scipy.stats.bootstrap`.

    Every call draws from a generator seeded with ``seed``, so each region and metric of a comparison
    resamples the same cases (and a run repeats its CIs). One case has no resampling to do (scipy
    refuses a sample of one): its CI is its difference.
    """
    diff = np.asarray(diff, dtype=float)
    if diff.size == 1:
        return float(diff[0]), float(diff[0])
    result = stats.bootstrap(
        (diff,),
        np.mean,
        n_resamples=n_bootstrap,
        confidence_level=0.95,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _metrics_of_both(
    metrics: Sequence[str] | None, row_a: dict, row_b: dict, path_a: str | Path, path_b: str | Path
) -> list[str]:
    """The metrics to compare: each one asked for must be a column of both files (one sentence otherwise,
    with the closest column); by default those of :data:`SUMMARY_METRICS` that both files hold."""
    if not metrics:
        common = [m for m in SUMMARY_METRICS if m in row_a and m in row_b]
        if not common:
            raise ValueError(f"{path_a} and {path_b}: no metric column in common ({', '.join(SUMMARY_METRICS)})")
        return common
    for metric in metrics:
        for path, row in ((path_a, row_a), (path_b, row_b)):
            if metric not in row:
                columns = [c for c in row if c not in ("case", "region", "fold")]
                near = closest(metric, columns)
                raise OptionError(
                    f"metrics: {metric!r} is not a column of {path}"
                    + (f"; did you mean {near}?" if near else f" (its metrics: {', '.join(columns)})")
                )
    return list(metrics)


def format_comparison(results: Sequence[dict]) -> str:
    """One line per region and metric: difference, CI, p-values and verdict."""
    lines = [
        f"{'region':<6} {'metric':<20} {'mean B-A':>10} {'95% CI':>22} {'p Wilcoxon':>11} {'p t-test':>9}  verdict"
    ]
    for r in results:
        ci = f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]"
        lines.append(
            f"{r['region']:<6} {r['metric']:<20} {r['mean_diff']:>10.4f} {ci:>22} "
            f"{r['p_wilcoxon']:>11.4g} {r['p_ttest']:>9.4g}  {r['verdict']}"
        )
    return "\n".join(lines)


def _paired_p_values(diff: np.ndarray) -> tuple[float, float]:
    """Two-sided Wilcoxon signed-rank and paired t-test p-values of paired differences.

    All-zero differences (identical runs) give 1.0 for both: scipy returns NaN or raises there.
    """
    if np.allclose(diff, 0.0):
        return 1.0, 1.0
    try:
        p_w = float(stats.wilcoxon(diff).pvalue)
    except ValueError:  # fewer than two non-zero differences
        p_w = 1.0
    # a constant non-zero shift has zero variance: t is infinite (scipy warns and may return NaN)
    constant = np.allclose(diff, diff[0])
    p_t = (0.0 if len(diff) > 1 else 1.0) if constant else float(stats.ttest_1samp(diff, 0.0).pvalue)
    return p_w, p_t


def _verdict(metric: str, mean_diff: float, ci_low: float, ci_high: float, p: float, alpha: float) -> str:
    if p >= alpha or ci_low <= 0.0 <= ci_high:
        return "no significant difference"
    improved = (mean_diff < 0) if metric in LOWER_IS_BETTER else (mean_diff > 0)
    return f"B {'better' if improved else 'worse'} than A (p={p:.3g})"


def _index_rows(rows: list[dict], path: str | Path) -> dict[tuple[str, str], dict]:
    index: dict[tuple[str, str], dict] = {}
    for row in rows:
        key = (row["case"], row["region"])
        if key in index:
            raise ValueError(f"{path}: case {key[0]!r} region {key[1]!r} appears twice")
        index[key] = row
    return index


# ------------------------------------------------------------------ several comparisons at once: Holm


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error rate), in the order given.

    The ``i``-th smallest of ``m`` p-values becomes ``max over j <= i of min(1, (m - j + 1) * p_(j))``;
    a hypothesis is rejected at level ``alpha`` when its adjusted p-value is below ``alpha``. Written here
    because scipy offers only false-discovery-rate adjustments (``scipy.stats.false_discovery_control``)
    and statsmodels' ``multipletests`` would be a dependency for six lines.
    """
    p = np.asarray(p_values, dtype=float)
    m = len(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(np.argsort(p, kind="stable")):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return [float(v) for v in adjusted]


def with_holm(results: Sequence[dict], p_key: str, alpha: float = 0.05) -> list[dict]:
    """``results`` with ``p_holm``: ``p_key`` Holm-adjusted over the rows of each metric (every region and
    variant compared at once), and the verdict taken on it (the CI condition of :func:`compare` kept)."""
    out = [dict(r) for r in results]
    for metric in dict.fromkeys(r["metric"] for r in out):
        family = [r for r in out if r["metric"] == metric]
        for row, adjusted in zip(family, holm([r[p_key] for r in family]), strict=True):
            row["p_holm"] = adjusted
            low, high = row.get("ci_low", -np.inf), row.get("ci_high", np.inf)
            row["verdict"] = _verdict(metric, row["mean_diff"], low, high, adjusted, alpha)
    return out


def compare_variants(
    run_a_csv: str | Path,
    variant_csvs: Sequence[str | Path],
    metrics: Sequence[str] | None = None,
    n_bootstrap: int = 10000,
    seed: int = 0,
    alpha: float = 0.05,
    output_csv: str | Path | None = None,
    verbose: bool = True,
) -> list[dict]:
    """:func:`compare` of each variant against ``run_a``, every p-value Holm-adjusted at once.

    The family of one metric is every region of every variant: three regions of one variant are three
    tests, and a difference is called only if its Holm-adjusted Wilcoxon p-value (``p_holm``) is below
    ``alpha`` and its bootstrap CI excludes 0. Rows carry ``variant`` (the file of B).
    """
    results = []
    for variant in variant_csvs:
        rows = compare(run_a_csv, variant, metrics, n_bootstrap, seed, alpha, verbose=False)
        results += [{"variant": str(variant), **r} for r in rows]
    results = with_holm(results, "p_wilcoxon", alpha)
    if output_csv is not None:
        write_metrics_table(results, output_csv)
    if verbose:
        print(format_holm_comparison(results, "p Wilcoxon", "p_wilcoxon"))
    return results


def format_holm_comparison(results: Sequence[dict], test: str, p_key: str) -> str:
    """One line per (variant,) region and metric: the comparison and its Holm-adjusted p-value."""
    several = len({r.get("variant") for r in results}) > 1
    runs = "mean_a_sd" in results[0] if results else False
    head = f"{'variant':<24} " if several else ""
    if runs:
        head += f"{'region':<6} {'metric':<20} {'A mean +- sd':>20} {'B mean +- sd':>20} {'mean B-A':>10}"
    else:
        head += f"{'region':<6} {'metric':<20} {'mean B-A':>10} {'95% CI':>22}"
    lines = [f"{head} {test:>11} {'p Holm-adjusted':>16}  verdict"]
    for r in results:
        line = f"{Path(str(r['variant'])).parent.name or r['variant']:<24} " if several else ""
        line += f"{r['region']:<6} {r['metric']:<20} "
        if runs:
            line += f"{r['mean_a']:>11.4f} +- {r['mean_a_sd']:<6.4f}{r['mean_b']:>11.4f} +- {r['mean_b_sd']:<6.4f}"
            line += f"{r['mean_diff']:>10.4f}"
        else:
            ci = f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]"
            line += f"{r['mean_diff']:>10.4f} {ci:>22}"
        lines.append(f"{line} {r[p_key]:>11.4g} {r['p_holm']:>16.4g}  {r['verdict']}")
    families = len({r["region"] for r in results}) * max(1, len({r.get("variant") for r in results}))
    lines.append(f"Holm-adjusted over the {families} comparison(s) of each metric (regions x variants)")
    return "\n".join(lines)


# ------------------------------------------------------------------ repeated runs (bundle cv --seeds N)


def seed_runs(folder: str | Path) -> dict[int, Path]:
    """The runs of a repeated cross-validation: ``seed_<s>/cv_metrics.csv`` in ``folder``, by seed."""
    folder = Path(folder)
    runs = {}
    for path in sorted(folder.glob("seed_*/cv_metrics.csv")):
        suffix = path.parent.name.removeprefix("seed_")
        if suffix.lstrip("-").isdigit():
            runs[int(suffix)] = path
    return runs


def run_means(rows: Sequence[dict], metrics: Sequence[str]) -> dict[tuple[str, str], float]:
    """One cross-validation's figure per (region, metric): the mean of its per-fold means, as ``bundle cv``
    reports it (all cases alike without a ``fold`` column)."""
    out: dict[tuple[str, str], float] = {}
    for region in dict.fromkeys(r["region"] for r in rows):
        for metric in metrics:
            folds: dict[object, list[float]] = {}
            for r in rows:
                value = r.get(metric)
                if r["region"] == region and isinstance(value, float) and not np.isnan(value):
                    folds.setdefault(r.get("fold"), []).append(value)
            if folds:
                out[(region, metric)] = float(np.mean([np.mean(v) for v in folds.values()]))
    return out


def compare_runs(
    run_a: str | Path,
    variants: Sequence[str | Path],
    metrics: Sequence[str] | None = None,
    alpha: float = 0.05,
    output_csv: str | Path | None = None,
    verbose: bool = True,
) -> list[dict]:
    """Repeated cross-validations (``bundle cv --seeds N``) compared run by run: B (each variant) minus A.

    Each run (seed) gives one figure per region and metric (:func:`run_means`); runs are paired by seed,
    so both folders must hold the same seeds. Rows: ``region``, ``metric``, ``n_runs``, ``mean_a`` /
    ``mean_a_sd`` and ``mean_b`` / ``mean_b_sd`` (mean +- sample sd over the runs), ``mean_diff``,
    ``p_ttest`` (two-sided paired t-test across the runs) and ``p_wilcoxon``, ``p_holm`` (the t-test's,
    Holm-adjusted over every region and variant of the metric) and ``verdict`` on ``p_holm``.
    """
    runs_a = seed_runs(run_a)
    if not runs_a:
        raise ValueError(f"{run_a}: no seed_<s>/cv_metrics.csv (the runs of python -m bundle cv --seeds N)")
    results = []
    for variant in variants:
        runs_b = seed_runs(variant)
        if set(runs_b) != set(runs_a):
            raise ValueError(
                f"{variant}: seeds {sorted(runs_b)} differ from {run_a}'s {sorted(runs_a)}; runs are paired by seed"
            )
        seeds = sorted(runs_a)
        tables_a = {s: read_metrics_csv(runs_a[s]) for s in seeds}
        tables_b = {s: read_metrics_csv(runs_b[s]) for s in seeds}
        chosen = _metrics_of_both(
            metrics, tables_a[seeds[0]][0], tables_b[seeds[0]][0], runs_a[seeds[0]], runs_b[seeds[0]]
        )
        means_a = {s: run_means(tables_a[s], chosen) for s in seeds}
        means_b = {s: run_means(tables_b[s], chosen) for s in seeds}
        for region, metric in means_a[seeds[0]]:
            va = np.array([means_a[s][(region, metric)] for s in seeds])
            vb = np.array([means_b[s][(region, metric)] for s in seeds])
            p_w, p_t = _paired_p_values(vb - va)
            results.append(
                {
                    "variant": str(variant),
                    "region": region,
                    "metric": metric,
                    "n_runs": len(seeds),
                    "mean_a": float(va.mean()),
                    "mean_a_sd": float(va.std(ddof=1)) if len(va) > 1 else 0.0,
                    "mean_b": float(vb.mean()),
                    "mean_b_sd": float(vb.std(ddof=1)) if len(vb) > 1 else 0.0,
                    "mean_diff": float((vb - va).mean()),
                    "p_ttest": p_t,
                    "p_wilcoxon": p_w,
                }
            )
    results = with_holm(results, "p_ttest", alpha)
    if output_csv is not None:
        write_metrics_table(results, output_csv)
    if verbose:
        n = results[0]["n_runs"] if results else 0
        print(f"{n} runs per side, paired by seed; mean +- sd over the runs of each run's mean of fold means")
        print(format_holm_comparison(results, "p t-test", "p_ttest"))
    return results
