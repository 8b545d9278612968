"""`ant-ray`: the command line. Every subcommand validates its configuration before starting anything."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

import yaml

from ant_ray import __version__
from ant_ray.config import ConfigError, PipelineConfig, load_config
from ant_ray.files import check_output_dir

SEARCH_SPACES = Path(__file__).resolve().parent.parent / "search_spaces"


def _add_config_args(parser: argparse.ArgumentParser, config_required: bool) -> None:
    if config_required:
        parser.add_argument("config", help="a YAML file (see search_spaces/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set pretrain.steps=200 (repeatable)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: RAY_ADDRESS, else a private local Ray)")
    parser.add_argument("--output-dir", default=None, help="where runs, caches and the MLflow store go")


def _add_comparison_parser(sub, name: str, summary: str, description: str, example_report: str) -> None:
    parser = sub.add_parser(name, help=summary, description=description)
    _add_config_args(parser, config_required=True)
    parser.add_argument("--report", default=None, metavar="PATH",
                        help=f"also write the Markdown table here (e.g. benchmarks/{example_report})")


class _Parser(argparse.ArgumentParser):
    """argparse, plus a hint when a shell split an unquoted `--set` value into several arguments."""

    def parse_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        namespace, extras = self.parse_known_args(argv, namespace)
        if extras:
            hint = set_quoting_hint(argv, extras)
            self.error(f"unrecognized arguments: {' '.join(extras)}" + (f"\n{hint}" if hint else ""))
        return namespace


def set_quoting_hint(argv: list[str], extras: list[str]) -> str | None:
    """`--set search.merge.fidelities=[250, 500]` typed without quotes reaches us as `--set
    search.merge.fidelities=[250,` and an unrecognized `500]`: name the quoted form. None when no `--set` precedes
    the first unrecognized argument."""
    import shlex

    first = next((i for i, token in enumerate(argv) if token in extras), None)
    if first is None or argv[first].startswith("-"):  # a mistyped option, not the tail of a value
        return None
    # the first unrecognized argument follows a --set's value directly: `--set KEY=V1 V2` or `--set=KEY=V1 V2`
    if first >= 1 and argv[first - 1].startswith("--set="):
        start = first - 1
    elif first >= 2 and argv[first - 2] == "--set":
        start = first - 2
    else:
        return None
    end = first
    while end < len(argv) and argv[end] in extras:  # the rest of the split value
        end += 1
    value = " ".join([argv[start].removeprefix("--set").removeprefix("=")] + argv[start + 1:end]).strip()
    return f"hint: a --set value with spaces needs quotes in a shell, e.g. --set {shlex.quote(value)}"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ant-ray", description=(
        "Distributed search for diffusion models trained as multi-task learners (ANT clustering, DeMe merging) "
        "on Ray, tracked in MLflow."))
    parser.add_argument("--version", action="version", version=f"ant-ray {__version__}")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's, Tune's and MLflow's own logs (hidden by default)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="the main job on the embedded default: a small chained search on digits",
                          description="Run search_spaces/quickstart.yaml: search ANT's k and MTL method, then DeMe's "
                                      "p with ranges from the ANT winner's intervals, then the merge weights by "
                                      "successive halving, on scikit-learn's digits with a private local Ray and "
                                      "MLflow in a SQLite file; print the result table.")
    _add_config_args(demo, config_required=False)

    search = sub.add_parser("search", help="search k / method (ant), p / N / lambda (deme) and merge weights by FID",
                            description="Run the config's search: section with Ray Tune + Optuna: the stages it "
                                        "names (ant -> deme -> merge), each from the previous winner, then re-score "
                                        "the winner at search.final and save it in diffusers format.")
    search.add_argument("config", nargs="?", default=None,
                        help="a YAML file with a search: section (see search_spaces/); optional with --resume")
    _add_config_args(search, config_required=False)
    search.add_argument("--resume", default=None, metavar="SEARCH_DIR",
                        help="continue an interrupted search: finished stages and trials are kept, interrupted "
                             "trials continue from their last checkpoint")

    ui = sub.add_parser("ui", help="open the MLflow UI on this project's tracking store (127.0.0.1)",
                        description="Start `mlflow ui` on the output directory's SQLite store (or "
                                    "MLFLOW_TRACKING_URI), bound to 127.0.0.1, and print its URL.")
    ui.add_argument("--output-dir", default="ant_ray_runs", help="the output_dir whose mlflow.db to open")
    ui.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    ui.add_argument("--host", default=None,
                    help="bind address (default: 127.0.0.1, this machine only; the UI has no login, so another "
                         "address lets anyone who reaches it read and change the runs)")

    run = sub.add_parser("run", help="run the fixed DeMe pipeline from a YAML config (no search over p or N)",
                         description="Run pretrain -> DeMe specialists -> merge-weight search from a config file.")
    _add_config_args(run, config_required=True)
    run.add_argument("--resume", default=None, metavar="RUN_DIR",
                     help="continue an interrupted run: finished specialists are kept, interrupted ones continue "
                          "from their last checkpoint, the merge search runs again")

    ant = sub.add_parser("train-ant", help="train with ANT clustered MTL from a YAML config (the ant: section)",
                         description="Cluster the timesteps (ant.clustering), train with an MTL method over the "
                                     "clusters on Ray Train (ant.resources), score the EMA model's FID, log to MLflow.")
    _add_config_args(ant, config_required=True)
    ant.add_argument("--resume-from", default=None, metavar="CHECKPOINT",
                     help="continue from the checkpoint/ folder of an earlier train-ant run")

    _add_comparison_parser(sub, "compare-deme", "DeMe's comparison: pretrained vs finetune baselines vs DeMe",
                           "Run pretrained, plain finetune, each loss-weighting baseline (SNR+1, truncated SNR, "
                           "min-SNR, P2), DeMe ensemble and DeMe merged for every seed in comparison.seeds, and "
                           "write a mean/std table to MLflow and --report.", "deme_comparison_digits.md")
    _add_comparison_parser(sub, "compare-ant", "ANT's comparison: vanilla vs MTL methods x clusterings",
                           "Train vanilla (k=1, LS) and ANT with every method in comparison.ant_methods and "
                           "clustering in comparison.ant_clusterings, for every seed in comparison.seeds, and write "
                           "a mean/std FID table.", "ant_comparison_digits.md")

    analyze = sub.add_parser("analyze", help="analyses of a trained setup (ntg: negative transfer gap)",
                             description="Analyses from the ANT paper.")
    analyses = analyze.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    ntg = analyses.add_parser("ntg", help="negative transfer gap per timestep interval (ANT Eq. 3)",
                              description="Train an interval model per interval (the pretrain recipe restricted to "
                                          "it), sample with the all-task model swapping the interval model in inside "
                                          "its interval, and report FID(mixed) - FID(all-task) per interval, with a "
                                          "bar chart in MLflow.")
    _add_config_args(ntg, config_required=True)
    ntg.add_argument("--intervals", default=None, metavar="A,B;C,D",
                     help="half-open intervals, e.g. '0,200;200,400' (default: ant.k equal intervals)")

    check = sub.add_parser("validate", help="validate a config and print it with every default filled in",
                           description="Load, override and validate a config without starting anything.")
    _add_config_args(check, config_required=True)
    return parser


def _load(args: argparse.Namespace, default: Path | None = None) -> PipelineConfig:
    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    return load_config(getattr(args, "config", None) or default, overrides)


def _missing_paths(cfg: PipelineConfig) -> list[str]:
    """The config's paths that this machine lacks: `validate` names them without failing, since a config for a
    cluster may name paths that only its nodes have."""
    from ant_ray.diffusion.presets import PRESETS

    notes = []
    if cfg.model.base not in PRESETS and not (Path(cfg.model.base) / "config.json").is_file():
        notes.append(f"model.base {cfg.model.base!r} is neither a preset ({', '.join(PRESETS)}) nor a diffusers "
                     "model folder")
    if cfg.data.path is not None and not Path(cfg.data.path).exists():
        notes.append(f"data.path {cfg.data.path} does not exist")
    merge = cfg.search.merge if cfg.search else None
    for path in ([*merge.task_vectors, merge.base_model] if merge is not None and merge.task_vectors else []):
        if not Path(path).exists():
            notes.append(f"search.merge: {path} does not exist")
    try:
        check_output_dir(cfg.output_path())
    except ValueError as err:
        notes.append(str(err).split(";")[0])
    return notes


def _parse_intervals(text: str) -> list[tuple[int, int]]:
    """--intervals '0,200;200,400' -> [(0, 200), (200, 400)]."""
    try:
        intervals = [tuple(int(x) for x in part.split(",")) for part in text.split(";")]
    except ValueError:
        intervals = []
    if not intervals or any(len(interval) != 2 for interval in intervals):
        raise ConfigError(f"--intervals expects half-open timestep intervals 'a,b;c,d' (e.g. '0,200;200,1000'), got "
                          f"{text!r}")
    return intervals


_signals_received: list[int] = []


def _exit_on_sigterm(signum, frame) -> None:
    # A killed job (SIGTERM from `ray job stop`, a scheduler, or kill) unwinds like Ctrl-C: MLflow runs are marked
    # KILLED and Ray's exit hook shuts down the private local cluster instead of leaving workers behind.
    _signals_received.append(signum)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    try:
        return _run_command(argv)
    except KeyboardInterrupt:  # Ctrl-C: the command has said what it stopped (a search: how to resume it)
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        # Ray and Tune code that the SystemExit unwinds through may replace it with SystemExit(1); a terminated
        # process still exits 128 + the signal, as shells and schedulers expect.
        if _signals_received:
            return 128 + _signals_received[0]
        raise


def _run_command(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ["ANT_RAY_VERBOSE"] = "1"  # inherited by the private Ray's workers
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.command == "ui":
        return _open_ui(args)
    try:
        if args.command == "search" and args.config is None:
            if not args.resume:
                raise ConfigError("ant-ray search needs a CONFIG file (see search_spaces/), or --resume SEARCH_DIR")
            if not Path(args.resume).is_dir():
                raise ConfigError(f"--resume {args.resume} does not exist; pass the folder the search printed, "
                                  "<output_dir>/searches/<name>-<date>-<id>")
            if not (Path(args.resume) / "config.yaml").is_file():
                raise ConfigError(f"--resume {args.resume} is not a search folder (it has no config.yaml); pass the "
                                  "folder the search printed, <output_dir>/searches/<name>-<date>-<id>")
            args.config = str(Path(args.resume) / "config.yaml")
        cfg = _load(args, default=SEARCH_SPACES / "quickstart.yaml")
        intervals = _parse_intervals(args.intervals) if getattr(args, "intervals", None) else None
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "validate":
        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        for note in _missing_paths(cfg):
            print(f"warning: {note} on this machine (fine if it exists where the job runs, e.g. on a cluster's "
                  "shared storage; a command run here fails on it)", file=sys.stderr)
        return 0
    if args.command in ("search", "demo"):
        try:  # the checks that need no torch or Ray, before their imports (seconds)
            cfg.check_searchable()
            check_output_dir(cfg.output_path())
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        from ant_ray.search.chain import run_search

        resume = Path(args.resume) if getattr(args, "resume", None) else None
        return _print_table(lambda: run_search(cfg, resume=resume).table())
    if args.command == "train-ant":
        from ant_ray.stages.ant_train import run_ant

        return _print_table(lambda: run_ant(cfg, resume_from=args.resume_from).table())
    if args.command == "analyze":
        from ant_ray.experiments.ntg import equal_intervals, run_ntg

        intervals = intervals or equal_intervals(cfg.ant.k, cfg.diffusion.T)
        return _print_table(lambda: run_ntg(cfg, intervals).table(), errors=(ValueError,))
    report = Path(args.report) if getattr(args, "report", None) else None
    if args.command == "compare-ant":
        from ant_ray.experiments.ant_comparison import run_ant_comparison

        return _print_table(lambda: run_ant_comparison(cfg, cfg.comparison.seeds, report=report).markdown(cfg.name))
    if args.command == "compare-deme":
        from ant_ray.experiments.deme_comparison import run_deme_comparison

        return _print_table(lambda: run_deme_comparison(cfg, cfg.comparison.seeds, report=report).markdown(cfg.name))
    from ant_ray.experiments.pipeline import run_pipeline

    return _print_table(
        lambda: run_pipeline(cfg, resume=Path(args.resume) if getattr(args, "resume", None) else None).table())


def _print_table(compute: Callable[[], str],
                 errors: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)) -> int:
    """Run a command and print its result table; an error of the given kinds (bad input found by the stage itself)
    or missing Inception weights is printed as one line with exit status 2 instead of a traceback."""
    from ant_ray.fid import InceptionUnavailable
    from ant_ray.search.outcome import SearchStageFailed
    from ant_ray.stages.ray_logs import quiet_driver_logs
    from ant_ray.stages.ray_train import TrainingRunFailed

    quiet_driver_logs()
    try:
        table = compute()
    except (*errors, InceptionUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (TrainingRunFailed, SearchStageFailed, FloatingPointError) as err:
        # a run that diverged, a stage none of whose trials finished: one line, the details are in MLflow
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        _stop_ray()
    print()
    print(table)
    return 0


def _stop_ray() -> None:
    """Shut Ray down before the table is printed, so that no late worker output follows it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _open_ui(args: argparse.Namespace) -> int:
    """`mlflow ui` on the project's store, bound to 127.0.0.1 unless --host says otherwise. The server (uvicorn's
    workers, MLflow's huey job consumer) runs in a process group of its own, stopped as a whole when this command
    ends in any way but SIGKILL: Ctrl-C, SIGTERM, or the server's own exit."""
    import os
    import subprocess

    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(args.output_dir).expanduser().resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        print(f"error: no MLflow store at {uri.removeprefix('sqlite:///')}; run a job first or pass --output-dir",
              file=sys.stderr)
        return 2
    if uri.startswith(("http://", "https://")):
        print(f"MLflow runs on a server: open {uri}")
        return 0
    from ant_ray.tracking import saved_runs_pages

    host = args.host or "127.0.0.1"
    warning = ui_host_warning(host, args.port)
    if warning:
        print(warning, file=sys.stderr)
    address = f"http://{host}:{args.port}"
    print(f"MLflow UI: {address}  (store {uri}; Ctrl-C stops it)")
    for experiment, page in saved_runs_pages(uri).items():  # the runs tables (the UI opens on GenAI pages)
        print(f"  {experiment}: {address}/{page}")
    sys.stdout.flush()
    # two server processes are plenty for one person's browser; uvicorn's per-request lines stay out of the terminal
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host,
               "--port", str(args.port), "--workers", "2", "--uvicorn-opts", "--log-level warning"]
    # the libraries' deprecation notices to their own developers (file paths and all) are not for this terminal
    quiet = "ignore::DeprecationWarning,ignore:starlette.middleware.wsgi is deprecated"
    server = subprocess.Popen(command, env={**os.environ, "PYTHONWARNINGS": quiet}, start_new_session=True)
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:  # SIGTERM arrives here as SystemExit (_exit_on_sigterm)
        stop_process_group(server)


def ui_host_warning(host: str, port: int) -> str | None:
    """The one line `ant-ray ui --host` prints when the UI would listen beyond this machine."""
    if host in ("localhost", "::1") or host.startswith("127."):
        return None
    return (f"warning: the MLflow UI listens on {host}:{port} without a login: anyone who can reach this machine "
            "there can read and change the runs")


def stop_process_group(leader: subprocess.Popen, grace_s: float = 5.0) -> None:
    """Stop every process of the group `leader` heads (it was started with start_new_session=True): SIGTERM, then
    SIGKILL for what is left after `grace_s`."""
    import time

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(leader.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            leader.poll()  # reap the leader once it exits
            if not running_in_group(leader.pid):
                return
            time.sleep(0.1)


def running_in_group(group: int) -> bool:
    """Whether a process of the group still runs. Exited ones wait as zombies until their parent (PID 1 for the
    server's orphaned workers) collects them, which can take a while; they hold no port."""
    if not Path("/proc/self/stat").exists():  # no /proc: zombies count too
        try:
            os.killpg(group, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
        except (OSError, IndexError):
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            return True
    return False


if __name__ == "__main__":
    sys.exit(main())
