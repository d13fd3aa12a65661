"""``recserve train``: fit a small DLRM on a Criteo (or Avazu) sample on the CPU, compare it with a
logistic regression and a constant predictor on the test split, save it for serving."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from recserve.train import (
    DATASETS,
    CrossValidation,
    Metrics,
    TrainOptions,
    TrainReport,
    cross_validate,
    dataset_config,
    split_readers,
    train_dlrm,
)


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths, got {text!r}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    defaults = TrainOptions()
    p = sub.add_parser(
        "train",
        help="fit a small DLRM on a Criteo/Avazu sample (CPU) and save it",
        description="Fit a recserve DLRM on the train split (early stopping on dev), report "
        "logloss and AUC on the test split beside a logistic regression on the same features "
        "and a constant predictor, and save the model folder.",
    )
    p.add_argument(
        "--data", help="folder with the splits (criteo: train/dev/test.tsv; avazu: .csv)"
    )
    p.add_argument("--train", help="train file (overrides --data)")
    p.add_argument("--dev", help="dev file (overrides --data)")
    p.add_argument("--test", help="test file (overrides --data)")
    p.add_argument("--dataset", choices=DATASETS, default="criteo", help="file format")
    p.add_argument("--out", default=None, help="model folder to write (default: models/<name>)")
    p.add_argument("--rows-per-table", type=int, default=4096, help="hash range of every table")
    p.add_argument("--dim", type=int, default=8, help="embedding dimension")
    p.add_argument("--bottom", type=_widths, default=(64,), help="bottom MLP hidden widths")
    p.add_argument("--top", type=_widths, default=(64,), help="top MLP hidden widths")
    p.add_argument("--interaction", choices=("cat", "dot"), default="cat")
    p.add_argument("--hash", choices=("hex", "fnv"), default="hex", help="criteo categoricals")
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr, help="Adam, dense layers")
    p.add_argument(
        "--embedding-lr", type=float, default=defaults.embedding_lr, help="row-wise Adagrad"
    )
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="dense layers")
    p.add_argument(
        "--min-count", type=int, default=defaults.min_count, help="rarer ids share a row"
    )
    p.add_argument(
        "--patience", type=int, default=defaults.patience, help="early stopping (epochs)"
    )
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument(
        "--threads", type=int, default=defaults.threads, help="CPU threads while fitting"
    )
    p.add_argument(
        "--folds",
        type=int,
        default=0,
        help="also cross-validate DLRM vs logistic regression over K folds of all examples "
        "(out-of-fold predictions pooled: a far larger test set than one split)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.epochs <= 0 or args.batch_size <= 0 or args.rows_per_table <= 0 or args.dim <= 0:
        raise ValueError("--epochs, --batch-size, --rows-per-table and --dim must be positive")
    config = dataset_config(
        args.dataset, args.rows_per_table, args.dim, args.bottom, args.top, args.interaction
    )
    files = {s: getattr(args, s) for s in ("train", "dev", "test") if getattr(args, s)}
    readers = split_readers(args.dataset, config, args.data, files, hash=args.hash)
    options = TrainOptions(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        embedding_lr=args.embedding_lr,
        weight_decay=args.weight_decay,
        min_count=args.min_count,
        patience=args.patience,
        seed=args.seed,
        threads=args.threads,
    )
    out = args.out or f"models/{config.name}"
    console = Console(stderr=args.json)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("epoch {task.fields[epoch]} loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        console=console,
        transient=args.json,
    ) as progress:
        tasks: dict[str, TaskID] = {}

        def finish() -> None:
            for task in tasks.values():
                progress.update(task, total=progress.tasks[task].completed)

        def on_step(which: str, epoch: int, loss: float) -> None:
            if which not in tasks:
                finish()  # the previous model is done: stop its clock
                label = "DLRM" if which == "dlrm" else "logistic regression"
                tasks[which] = progress.add_task(label, total=None, epoch=0, loss=loss)
            progress.update(tasks[which], advance=1, epoch=epoch + 1, loss=loss)

        _, report = train_dlrm(config, readers, options, out=out, on_step=on_step)
        finish()
        cv = None
        if args.folds:
            task = progress.add_task("cross-validation", total=args.folds, epoch=0, loss=0.0)

            def on_fold(k: int, metrics: dict[str, Metrics]) -> None:
                progress.update(task, advance=1, epoch=k + 1, loss=metrics["dlrm"].logloss)

            readers = split_readers(args.dataset, config, args.data, files, hash=args.hash)
            cv = cross_validate(config, readers, args.folds, options, on_fold)
    if args.json:
        out_dict = report.to_dict()
        if cv is not None:
            out_dict["cross_validation"] = cv.to_dict()
        print(json.dumps(out_dict))
    else:
        _print_report(console, report)
        if cv is not None:
            _print_cv(console, cv)
    return 0


def _print_cv(console: Console, cv: CrossValidation) -> None:
    k = len(cv.folds)
    table = Table(title=f"{k}-fold cross-validation over all {cv.rows} examples")
    for column in ("test set", "DLRM AUC", "LR AUC", "DLRM logloss", "LR logloss", "const logloss"):
        table.add_column(column, justify="left" if column == "test set" else "right")
    rows = [(f"fold {i + 1}", f) for i, f in enumerate(cv.folds)] + [("pooled", cv.pooled)]
    for label, m in rows:
        table.add_row(
            label,
            f"{m['dlrm'].auc:.4f}",
            f"{m['logistic_regression'].auc:.4f}",
            f"{m['dlrm'].logloss:.4f}",
            f"{m['logistic_regression'].logloss:.4f}",
            f"{m['constant'].logloss:.4f}",
        )
    console.print(table)
    wins = sum(f["dlrm"].auc > f["logistic_regression"].auc for f in cv.folds)
    verdict = "beats" if cv.beats_baselines else "does not beat"
    console.print(
        f"Pooled out of fold (every example predicted once by models that never saw it), the "
        f"DLRM {verdict} both baselines on AUC and logloss; its AUC is higher than the "
        f"logistic regression's on {wins} of {k} folds ({cv.seconds:.0f} s)."
    )


def _print_report(console: Console, report: TrainReport) -> None:
    table = Table(
        title=f"test split ({report.rows['test']} examples), dev split ({report.rows['dev']})"
    )
    for column in ("model", "test logloss", "test AUC", "dev logloss", "dev AUC"):
        table.add_column(column, justify="left" if column == "model" else "right")
    rows = (
        (f"recserve DLRM ({report.config.interaction})", report.model, report.fit.dev),
        ("logistic regression", report.logistic, report.logistic_fit.dev),
        (f"constant ({report.base_rate:.3f})", report.constant, report.constant_dev),
    )
    for label, test, dev in rows:
        table.add_row(
            label, f"{test.logloss:.4f}", f"{test.auc:.4f}", f"{dev.logloss:.4f}", f"{dev.auc:.4f}"
        )
    console.print(table)
    verdict = "beats" if report.beats_baselines else "does not beat"
    console.print(
        f"DLRM fitted in {report.seconds:.1f} s (best epoch {report.fit.best_epoch + 1} of "
        f"{report.fit.epochs_run}); on the test split it {verdict} both baselines on logloss "
        "and AUC. (Dev metrics chose the stopping epoch, so they flatter both models.)"
    )
    if report.folder:
        console.print(f"saved to {report.folder} (serve it like any recserve model folder)")
