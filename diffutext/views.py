"""What the command line shows (rich; with cli.py the only module that prints).

`out` and `err` are the two consoles (only rank 0 prints under torchrun). `TrainView` and
`DecodeView` render the engine's callback events (a progress bar on a terminal, plain lines in
logs); `examples`, `metrics_table` and `ablation_table` draw results. Every table names which BLEU
a number is.
"""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
for _console in (out, err):
    if not _console.is_terminal:  # logs and pipes: wide enough that tables never truncate
        _console.width = 200
if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 prints
    out.quiet = err.quiet = True


def _progress(label: str, *columns, transient: bool = False):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        *columns,
        TimeElapsedColumn(),
        console=err,
        disable=not err.is_terminal,
        transient=transient,
    )


class TrainView:
    """Renders training events: a progress bar on a terminal, a line per evaluation everywhere."""

    def __enter__(self):
        from rich.progress import TextColumn, TimeRemainingColumn

        self.progress = _progress("train", TextColumn("{task.fields[info]}"), TimeRemainingColumn())
        self.progress.__enter__()
        self.task = self.status = None
        return self

    def __exit__(self, *exc):
        self._clear_status()
        self.progress.__exit__(*exc)

    def _clear_status(self) -> None:
        if self.status is not None:
            self.progress.remove_task(self.status)
            self.status = None

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        self._clear_status()
        if event == "status":
            # A transient row of the progress display on a terminal, nothing elsewhere: so that bad input
            # still gets exactly one line.
            if err.is_terminal:
                self.status = self.progress.add_task("status", total=None, info=info["message"])
        elif event == "choice":  # a setting the run chose from its data: a line of its own, like the warnings
            err.print(info["message"])
        elif event == "start":
            err.print(
                f"run {info['run_dir']}: {info['parameters'] / 1e6:.2f}M parameters, {info['train_examples']} training pairs "
                f"of {info['task_source']} ({info['truncated']} truncated), vocabulary {info['vocab_size']}, device {info['device']}"
            )
            if info["truncated"]:
                seq_len = info["config"]["model"]["seq_len"]
                err.print(
                    f"warning: {info['truncated']} of {info['train_examples']} training pairs are longer than seq_len {seq_len} "
                    "tokens and were truncated (the longer side first, as DiffuSeq does)"
                )
            self.task = self.progress.add_task("train", total=info["max_steps"], completed=info["step"], info="")
        elif event == "log" and self.task is not None:
            line = f"{loss_terms(info)}  {info['tokens_per_s']:.0f} tok/s"
            self.progress.update(self.task, completed=info["step"], info=line)
            if not err.is_terminal:  # no live view under nohup, a scheduler or CI: a plain line per log step
                err.print(f"step {info['step']}: {line}  lr {info['lr']:.3g}  {info['elapsed_s']:.0f} s", highlight=False)
        elif event == "eval":
            err.print(f"step {info['step']}: valid {loss_terms(info, 'valid_')}")
        elif event == "end":
            err.print(f"trained {info['step']} steps in {info['elapsed_s'] / 60:.1f} min")


TERMS = ("loss", "mse", "decoder_nll", "ce", "length", "penalty", "anchor")  # the loss terms a progress line shows


def loss_terms(info: dict[str, Any], prefix: str = "") -> str:
    """The loss terms of a log or eval record that it has, as "loss 1.2345  ce 1.2000 …"."""
    return "  ".join(f"{name} {info[prefix + name]:.4f}" for name in TERMS if prefix + name in info)


class DecodeView:
    """Renders decoding events: transient progress bars on a terminal (sentences, and the denoising steps of the
    chain in hand: a 2000-step chain takes minutes), a line per ablation cell."""

    def __init__(self, label: str):
        from rich.progress import TextColumn

        self.progress = _progress(label, TextColumn("{task.description}"), transient=True)
        self.task = self.chain = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event == "progress":
            if self.task is None:
                self.task = self.progress.add_task("sentences", total=info["total"])
            self.progress.update(self.task, completed=info["done"], total=info["total"])
        elif event == "step":
            if self.chain is None:
                self.chain = self.progress.add_task("denoising steps", total=info["total"])
            self.progress.update(self.chain, completed=info["done"], total=info["total"])
        elif event == "cell":
            for task in (self.task, self.chain):
                if task is not None:
                    self.progress.update(task, completed=0)
            err.print(f"{info['sampler']} × {info['steps']} steps")


def examples(srcs, refs, hyps, show: int) -> None:
    """The first `show` source / output / reference triples."""
    for s, r, h in list(zip(srcs, refs, hyps))[:show]:
        out.print(
            f"[bold]source[/]    {escape(s)}\n[bold]output[/]    {escape(h)}"
            + (f"\n[bold]reference[/] {escape(r[0])}" if r else "")
            + (f" (+{len(r) - 1} more)" if len(r) > 1 else "")
            + "\n",
            markup=True,
        )


METRICS = [
    ("sacrebleu", "sacreBLEU (corpus, 0-100)", "{:.2f}"),
    ("sentence_bleu", "BLEU-4 (textbook sentence BLEU: nltk, method4, every reference, 0-1)", "{:.4f}"),
    ("rouge_l", "ROUGE-L F (rouge-score, 0-1)", "{:.4f}"),
    ("bertscore_f1", "BERTScore F1 ({bertscore_model})", "{:.4f}"),
    ("dist_1", "dist-1 (corpus)", "{:.4f}"),
    ("avg_len", "average length (words)", "{:.2f}"),
    ("self_bleu", "self-BLEU over seeds (0-1)", "{:.4f}"),
    ("div_4", "div-4 over seeds", "{:.4f}"),
    ("count", "sentences", "{}"),
    ("seconds", "decode seconds", "{:.1f}"),
    ("sentences_per_s", "sentences / s", "{:.2f}"),
]
DIFFUSEQ = "DiffuSeq's eval_seq2seq.py ({diffuseq_script})"
METRICS += [
    ("diffuseq_bleu", f"BLEU-4, {DIFFUSEQ}", "{:.4f}"),
    ("diffuseq_rouge_l", f"ROUGE-L F, {DIFFUSEQ}", "{:.4f}"),
    ("diffuseq_dist_1", f"dist-1 (per sentence), {DIFFUSEQ}", "{:.4f}"),
    ("diffuseq_avg_len", f"average length (split(' ')), {DIFFUSEQ}", "{:.2f}"),
    ("diffuseq_self_bleu", f"self-BLEU (pairs i < j), {DIFFUSEQ}", "{:.4f}"),
    ("diffuseq_div_4", f"div-4, {DIFFUSEQ}", "{:.4f}"),
]


def metrics_table(title: str, scores: dict[str, Any]) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label, fmt in METRICS:
        if key in scores:
            table.add_row(label.format(**scores), fmt.format(scores[key]))
    return table


def ablation_table(rows, marks, label: str, split: str, n: int, seeds: int) -> Table:
    """One checkpoint's cells; the best value of each column (`marks`, from ablation.best) in bold."""
    from .ablation import FLOORS  # here, not at the top: --help imports no torch

    idx = [i for i, r in enumerate(rows) if r["checkpoint"] == label]
    step = rows[idx[0]]["step"]
    table = Table(title=f"{label} (step {step}) — {split} split, {n} sentences × {seeds} seed(s); best of each column in bold")
    cols = [
        ("sampler", None, "{}"),
        ("steps", None, "{}"),
        ("sacreBLEU", "sacrebleu", "{:.2f}"),
        ("sent. BLEU", "sentence_bleu", "{:.4f}"),
        ("DiffuSeq BLEU", "diffuseq_bleu", "{:.4f}"),
        ("ROUGE-L", "rouge_l", "{:.4f}"),
        ("dist-1", "dist_1", "{:.3f}"),
    ]
    if seeds > 1:
        cols.append(("self-BLEU", "self_bleu", "{:.3f}"))
    cols += [
        ("length", "avg_len", "{:.1f}"),
        ("seconds", "seconds", "{:.1f}"),
        ("sent/s", "sentences_per_s", "{:.1f}"),
        ("speed-up", "speedup", "{:.0f}×"),
    ]
    for head, _, _ in cols:
        table.add_column(head, justify="left" if head == "sampler" else "right")
    for i in idx:
        r = rows[i]
        cells = []
        for head, key, fmt in cols:
            value = r["sampler"] if head == "sampler" else r["steps"] if head == "steps" else r.get(key)
            copy_row_timing = r["sampler"] in FLOORS and head in ("steps", "seconds")
            text = "-" if value is None or copy_row_timing else fmt.format(value)
            cells.append(f"[bold green]{text}[/]" if (i, key) in marks else text)
        table.add_row(*cells, style="dim" if r["sampler"] in FLOORS else None)
    return table


def imported(info: dict[str, Any]) -> None:
    """What `import-diffuseq` wrote."""
    m = info["config"].model
    err.print(
        f"imported {info['source']} (step {info['step']}, {info['parameters'] / 1e6:.2f}M parameters): DiffuSeq's network, "
        f"{m.layers} layers × width {m.width}, {m.heads} heads, embedding {m.hidden_dim}, sequence {m.seq_len}, "
        f"vocabulary {m.vocab_size}, T = {info['config'].diffusion.T} ({info['config'].diffusion.schedule})",
        markup=False,
    )
    if info["head_differs"]:
        err.print(
            "note: the file's lm_head.weight differs from its word_embedding.weight (DiffuSeq's EMA files keep the raw "
            "model's head); DiffuSeq samples with lm_head.weight as the tied embedding, and so does this run",
            markup=False,
        )
    out.print(f"run folder: {info['run_dir']}")
