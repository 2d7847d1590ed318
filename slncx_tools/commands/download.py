import click


@click.command(short_help='Fetch ckpt-0 from the hub: parallel, resumable, SHA-256 verified, disk checked first.')
@click.option("--repo", default="xai-org/slncx", show_default=True, help="Model repo on the hub.")
@click.option("--revision", default="main", show_default=True, help="Branch, tag or commit.")
@click.option("--include", "include", multiple=True, default=("ckpt-0/*",), show_default=True,
              help="Only files matching this pattern (repeatable; `*` also matches `/`). Quote it in the shell.")
@click.option("--exclude", "exclude", multiple=True, help="Skip files matching this pattern (repeatable).")
@click.option("--dest", default="checkpoints", show_default=True, type=click.Path(file_okay=False),
              help="Local directory; files keep their repo paths under it (checkpoints/ckpt-0/...).")
@click.option("--workers", default=8, show_default=True, type=click.IntRange(1, 64), help="Files fetched in parallel.")
@click.option("--endpoint", default=None, help="Hub URL (default: $HF_ENDPOINT or https://huggingface.co).")
@click.option("--token", default=None, help="Hub token (default: $HF_TOKEN or the stored `hf auth login`).")
@click.option("--dry-run", is_flag=True, help="List files, sizes, total and the disk check; fetch nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan / the report as JSON (no progress bar).")
@click.option("-v", "--verbose", is_flag=True, help="One line per file (fetched, resumed, skipped, verified).")
def command(repo, revision, include, exclude, dest, workers, endpoint, token, dry_run, as_json, verbose):
    """Download a checkpoint from the model hub: resumable, parallel, verified while downloading.

    The defaults fetch what `huggingface-cli download xai-org/slncx --include 'ckpt-0/*'
    --local-dir checkpoints` fetches. Free disk space is checked before starting. Each file's
    SHA-256 is computed as it arrives and compared with the hub's LFS record (a mismatch deletes the
    file and fails). An interrupted run resumes where it stopped; files already complete and verified
    are skipped. On success writes ckpt-0/SHA256SUMS and checks the checkpoint's structure.
    """
    import json

    from ..errors import StructureError
    from ..hub import HubSource, check_disk, plan, run
    from ..progress import ClickBar
    from ..summary import human_bytes

    source = HubSource(repo, revision, endpoint=endpoint, token=token)
    p = plan(source, dest, include=include, exclude=exclude)

    if dry_run:
        if as_json:
            click.echo(json.dumps(p.to_dict(), indent=1))
            return
        width = max(len(f.remote.path) for f in p.files)
        for f in p.files:
            note = f" (have {f.have:,})" if f.action == "resume" else ""
            click.echo(f"{f.remote.path:<{width}}  {f.remote.size:>15,}  {f.action}{note}")
        c = p.counts()
        click.echo(
            f"{len(p.files)} of {p.repo_files} files in {p.source}, {human_bytes(p.total_bytes)} "
            f"({p.total_bytes:,} bytes): {c['fetch']} to fetch, {c['resume']} to resume, "
            f"{c['verify']} to verify locally, {c['skip']} already complete"
        )
        if p.ckpt_tensor_files():
            click.echo(_ckpt_note(p))
        click.echo(p.disk_message())
        return

    check_disk(p)
    if not as_json:
        click.echo(f"{p.source}: {len(p.files)} files, {human_bytes(p.total_bytes)}; {p.disk_message()}", err=True)

    def on_file(o):
        if not verbose or as_json:
            return
        if o.action == "failed":
            click.echo(f"failed   {o.path}: {o.error}", err=True)
            return
        extra = f", resumed at byte {o.resumed_from:,}" if o.action == "resumed" else ""
        retries = f", {o.attempts - 1} retries" if o.attempts > 1 else ""
        rate = f" in {o.seconds:.1f} s ({human_bytes(o.received / o.seconds)}/s)" if o.received and o.seconds > 0 else ""
        click.echo(f"{o.action:<8} {o.path}  {o.size:,} bytes{rate}{extra}{retries}  sha256 {o.sha256[:16]}…", err=True)

    with ClickBar("download", enabled=not as_json) as bar:
        report = run(p, source, workers=workers, progress=_with_rate(bar, p.total_bytes), on_file=on_file)

    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1))
    else:
        counts = {}
        for o in report.outcomes:
            counts[o.action] = counts.get(o.action, 0) + 1
        summary = ", ".join(f"{n} {a}" for a, n in sorted(counts.items()))
        rate = f" ({human_bytes(report.received / report.seconds)}/s)" if report.seconds > 0 and report.received else ""
        click.echo(
            f"{len(report.outcomes)} files in {p.dest} from {p.source}: {summary}; received "
            f"{human_bytes(report.received)} in {report.seconds:.1f} s{rate}, reused {human_bytes(report.reused)}"
        )
        for s in report.sums_files:
            click.echo(f"wrote {s}")
        if report.structure_checked and not report.problems:
            click.echo(f"structure: ok ({report.structure_checked})")
    if report.problems:
        for problem in report.problems:
            click.echo(f"problem: {problem}", err=True)
        raise StructureError(f"{len(report.problems)} structural problem(s) in {report.structure_checked}")


def _ckpt_note(p) -> str:
    from ..config import PRESETS
    from ..params import num_files

    n = p.ckpt_tensor_files()
    presets = ", ".join(f"{c.name} has {num_files(c)}" for c in PRESETS.values())
    match = [c.name for c in PRESETS.values() if num_files(c) == n]
    verdict = f"a complete {match[0]} ckpt-0" if match and p.ckpt_complete else "not a complete ckpt-0 of a known preset"
    return f"ckpt-0: {n} tensor files selected ({presets}): {verdict}"


def _with_rate(bar, total: int):
    """Label the bar with bytes done / total and the rate (on a terminal; a constant label otherwise,
    since click prints the label again each time it changes when the output is not a terminal)."""
    import sys
    import time

    from ..summary import human_bytes

    if not sys.stdout.isatty():
        return lambda done, total_, message="": bar(done, total_, "")
    t0, first = time.monotonic(), []

    def draw(done: int, total_: int, message: str = "") -> None:
        if not first:
            first.append(done)
        elapsed = time.monotonic() - t0
        rate = (done - first[0]) / elapsed if elapsed > 0 else 0.0
        bar(done, total_, f"{human_bytes(done)}/{human_bytes(total)} {human_bytes(rate)}/s")

    return draw
