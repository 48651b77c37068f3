"""The paper's downstream figures, printed beside ours: Table 3 (CLUE dev accuracy, %) and Table 6 (STS on the
SimCLUE test set, Pearson r / Spearman rho, after contrastive fine-tuning on differently sized pair sets).

Table 3's baseline rows are the CLUE benchmark's own published figures, as the paper quotes them; the first
row is the paper's model (§4.1 protocol: 3 epochs, peak LR 3e-5, linear decay, batch tuned in 16/32/64 per
task). Table 6 mixes the paper's two fine-tuning runs with other embedders whose training data are only
partly disclosed; the pair counts are indicative.
"""
from __future__ import annotations

TABLE3_COLUMNS = ("afqmc", "tnews", "iflytek", "cmnli", "cluewsc2020", "csl", "ocnli", "c3")
PAPER_TABLE3 = {  # dev accuracy, %, in TABLE3_COLUMNS order
    "Chinese ModernBERT": (73.87, 56.90, 60.15, 83.96, 52.10, 86.20, 79.10, 82.65),
    "RoBERTa-wwm-large": (76.55, 58.61, 62.98, 82.12, 74.60, 82.13, 78.20, 73.82),
    "RoBERTa-large": (74.02, 57.86, 62.55, 81.70, 72.70, 81.36, 76.82, 67.55),
    "ALBERT-xxlarge": (75.60, 59.46, 62.89, 83.14, 61.54, 83.63, 77.70, 73.28),
    "RoBERTa-wwm-ext": (74.04, 56.94, 60.31, 80.51, 67.80, 81.00, 74.72, 66.50),
}
PAPER_TABLE6 = (  # (model, contrastive pairs, backbone (8k support), Pearson r, Spearman rho) on SimCLUE test
    ("Chinese ModernBERT (SimCLUE + T2Ranking)", "~5M", "ModernBERT (yes)", 0.5050, 0.5367),
    ("Chinese ModernBERT (SimCLUE)", "~3M", "ModernBERT (yes)", 0.4882, 0.5219),
    ("Qwen-0.6B-embedding", "~169M", "Qwen3 (yes)", 0.4965, 0.5211),
    ("jina-embeddings-v2-base-zh", ">800M", "RoBERTa (yes)", 0.5188, 0.5501),
    ("gte-multilingual-base", "~2.94B", "BERT-like (yes)", 0.5384, 0.5730),
    ("gte-large-zh", "~803M", "BERT-like (no)", 0.5543, 0.5829),
    ("Conan-embedding-v1", "~404M", "RoBERTa-like (no)", 0.6065, 0.6424),
)


def table3(ours: dict, titles: dict, label: str) -> str:
    """Table 3's layout for the tasks in `ours` ({task: accuracy in [0, 1]}), in the paper's column order, with
    our row first and the paper's rows under it; `avg` is the mean over the columns shown, for every row."""
    tasks = [t for t in TABLE3_COLUMNS if t in ours] + [t for t in ours if t not in TABLE3_COLUMNS]
    width = max(28, len(label) + 1)
    lines = [f"{'model':<{width}}" + "".join(f"{titles.get(t, t):>9}" for t in tasks) + f"{'avg':>9}"]

    def row(name, values):
        shown = [v for v in values if v is not None]
        cells = "".join(f"{v:>9.2f}" if v is not None else f"{'-':>9}" for v in values)
        mean = f"{sum(shown) / len(shown):>9.2f}" if shown else f"{'-':>9}"
        return f"{name:<{width}}" + cells + mean
    lines.append(row(label, [100 * ours[t] for t in tasks]))
    for model, figures in PAPER_TABLE3.items():
        by_task = dict(zip(TABLE3_COLUMNS, figures))
        lines.append(row(f"{model} (paper)", [by_task.get(t) for t in tasks]))
    return "\n".join(lines)


def table6(ours: list) -> str:
    """Table 6's layout: our rows ((model, pairs, backbone, pearson, spearman)) first, then the paper's."""
    rows = [*ours, *((f"{m} (paper)", p, b, r, s) for m, p, b, r, s in PAPER_TABLE6)]
    width = max(len(r[0]) for r in rows) + 2
    pw = max(26, max(len(str(r[1])) for r in rows) + 2)
    bw = max(23, max(len(r[2]) for r in rows) + 2)
    lines = [f"{'model':<{width}}{'contrastive data (pairs)':<{pw}}{'backbone (8k support)':<{bw}}"
             "STS: Pearson r / Spearman rho"]
    lines += [f"{m:<{width}}{str(p):<{pw}}{b:<{bw}}{r:.4f} / {s:.4f}" for m, p, b, r, s in rows]
    return "\n".join(lines)
