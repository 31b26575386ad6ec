"""Sessions, named for what users type; the logic lives in mtpquant.pins.envs (environments, what `-- ARGS` become).

Sessions that need the same locks share one environment (`.venv`: calibrate + dev), rebuilt when a lock changes.
Options go after `--`: `nox -s quantize -- --run DIR [--runtime docker]`.
"""

import sys
from pathlib import Path

import nox

sys.path.insert(0, str(Path(__file__).parent / "src"))
from mtpquant.pins import envs  # noqa: E402  (stdlib only)

nox.options.sessions = ["tests"]
GLM5 = ("glm-5.2", "glm5-code-instruct")


def checked(session: nox.Session, fn, *args):
    try:
        return fn(*args)
    except envs.EnvError as e:
        session.error(str(e))


def env(session: nox.Session, name: str) -> str:
    return checked(session, envs.ensure, name, session.log)


def stages(session: nox.Session, *argvs: list[str], posargs: bool = False) -> None:
    """Each `mtpquant ARGV` in .venv, or in the calibration image with `--runtime docker` (same results)."""
    where, rest = checked(session, envs.split_runtime, session.posargs)
    python = env(session, "docker" if where == "docker" else "calibrate")
    for argv in argvs:
        session.run(python, *envs.stage_argv(where, [*argv, *(rest if posargs else [])]), external=True)


@nox.session(python=False)
def dev(session: nox.Session) -> None:
    """Make `.venv` (calibrate + dev locks, this package editable) and print how to activate it."""
    env(session, "calibrate")
    session.log(envs.activate_hint())


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """Run the test suite (real llm-compressor, vLLM CPU and lm-eval on tiny models)."""
    python, serve = env(session, "calibrate"), env(session, "serve")
    session.run(python, "-m", "pytest", *session.posargs, external=True,
                env={"MTPQUANT_SERVE_PYTHON": serve, "MTPQUANT_NOX": sys.executable})  # README commands run nox


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    """Lint with ruff."""
    session.run(env(session, "calibrate"), "-m", "ruff", "check", "src", "tests", "noxfile.py", "benchmarks",
                external=True)


@nox.session(python=False)
def demo(session: nox.Session) -> None:
    """The chain on three tiny models on this CPU, then serve, eval, bench and report (`-- --fresh`: start over)."""
    for line in checked(session, envs.demo_start, session.posargs):  # else finished stages are skipped
        session.log(line)
    stages(session, *(argv for demo in envs.DEMO for argv in envs.chain(*demo)))
    serve = env(session, "serve")
    for argv in envs.demo_serving(envs.DEMO[-1][0]):
        session.run(serve, "-m", "mtpquant", *argv, external=True)


@nox.session(python=False)
def artifact(session: nox.Session) -> None:
    """The real GLM-5.2 artifact (GPUs and hub): checks GPUs and pins before building any environment."""
    session.log("preflight: " + "; ".join(checked(session, envs.cheap_preflight, *GLM5)))
    stages(session, ["preflight", "--model", GLM5[0], "--calibration", GLM5[1]], *envs.chain(envs.ARTIFACT, *GLM5))


def stage_session(stage: str, doc: str) -> None:
    def stage_(session: nox.Session) -> None:
        stages(session, [stage], posargs=True)

    stage_.__doc__ = doc
    nox.session(name=stage, python=False)(stage_)


def command_session(name: str, env_name: str, argv: list[str], doc: str) -> None:
    def command(session: nox.Session) -> None:
        session.run(env(session, env_name), "-m", "mtpquant", *argv, *session.posargs, external=True)

    command.__doc__ = doc
    nox.session(name=name, python=False)(command)


for _stage, _doc in envs.STAGES.items():  # prepare, quantize, inject-mtp, verify, manifest
    stage_session(_stage, _doc)
for _name, (_env, _argv, _doc) in envs.commands().items():  # plan, train-tiny, serve-PROFILE, eval, bench, report
    command_session(_name, _env, _argv, _doc)


@nox.session(python="3.11")
def lock(session: nox.Session) -> None:
    """Regenerate every lockfile in pinned/ (`-- --check [--strict]`: report what would change today)."""
    session.install("--require-hashes", "-r", "pinned/tools.txt")
    session.run("python", "-m", "mtpquant.pins.locks", *envs.lock_command(session.posargs), env={"PYTHONPATH": "src"})


@nox.session(name="images-cuda", python=False)
@nox.session(python=False)
def images(session: nox.Session) -> None:
    """Build the images (`-- [--image I] [--flavour F] [--plan] [--push R]`); images-cuda: build+check+rebuild CUDA."""
    for argv in checked(session, envs.images_commands, session.posargs, session.name):
        session.run(env(session, "docker"), "-m", "mtpquant.images", *argv, external=True)


@nox.session(python=False)
def pull(session: nox.Session) -> None:
    """Fetch the published images by digest (a local build where none matches): `-- --image ... --flavour ...`."""
    session.run(env(session, "docker"), "-m", "mtpquant.images", "pull", *session.posargs, external=True)
