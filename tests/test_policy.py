"""The pin policy on the shipped Dockerfiles (every flavour's build args) and on bad examples; hadolint."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mtpquant import images
from mtpquant.pins.policy import check_dockerfile, main

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "containers").glob("*.Dockerfile"))
DIGEST = "@sha256:" + "a" * 64
SHA = "0123456789abcdef0123456789abcdef01234567"
GOOD_HEAD = f"FROM debian:bookworm{DIGEST} AS base\nCOPY pinned/tools.txt /tmp/lock.txt\n"
GOOD_TAIL = "USER 10001\n"


def flavour_args(image: str, flavour: str) -> dict[str, str]:
    fl = images.FLAVOURS[image][flavour]
    lock = images.load_images_lock()
    args = {"BASE_IMAGE": lock["base"][fl.base]["ref"], "LOCK": fl.lock, "APT_PACKAGES": fl.apt_packages,
            "APT_SNAPSHOT": images.UBUNTU_SNAPSHOT if fl.python != "3.11" else ""}
    if fl.kernels:
        args |= {"BUILD_IMAGE": lock["base"][fl.build_base]["ref"], "KERNELS": "cuda",
                 "BUILD_APT_PACKAGES": fl.build_apt_packages}
    return args


def test_images_are_the_shipped_dockerfiles():
    assert {f"{i}.Dockerfile" for i in images.FLAVOURS} == {p.name for p in DOCKERFILES}


@pytest.mark.parametrize("image,flavour", [(i, f) for i in images.FLAVOURS for f in images.FLAVOURS[i]])
def test_shipped_dockerfiles_pass_for_every_flavour(image, flavour):
    assert check_dockerfile(ROOT / "containers" / f"{image}.Dockerfile", flavour_args(image, flavour)) == []


def test_shipped_defaults_pass():
    assert [str(v) for f in DOCKERFILES for v in check_dockerfile(f)] == []


def test_hadolint_clean():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    proc = subprocess.run([exe, "--no-color", *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


BAD = {
    "base-digest": [
        "FROM debian:bookworm\nUSER 1\n",
        "ARG BASE=python:3.11-slim\nFROM ${BASE}\nUSER 1\n",
        "ARG BASE\nFROM ${BASE} AS x\nUSER 1\n",
        f"FROM debian:bookworm{DIGEST} AS a\nFROM b AS c\nUSER 1\n",
    ],
    "pip-lock": [
        GOOD_HEAD + "RUN pip install torch==2.13.0\n" + GOOD_TAIL,
        GOOD_HEAD + "RUN pip install -r /tmp/lock.txt\n" + GOOD_TAIL,
        GOOD_HEAD + "RUN python3 -m pip install --require-hashes -r requirements.txt\n" + GOOD_TAIL,
        GOOD_HEAD + "RUN uv pip install --system vllm\n" + GOOD_TAIL,
        GOOD_HEAD + "RUN pip install --require-hashes -r /tmp/lock.txt && pip install -U pip\n" + GOOD_TAIL,
        GOOD_HEAD + "RUN pip install -e /opt/src\n" + GOOD_TAIL,
        GOOD_HEAD + f"RUN pip install git+https://github.com/vllm-project/vllm@{SHA}\n" + GOOD_TAIL,
    ],
    "git-sha": [
        GOOD_HEAD + "RUN git clone https://github.com/deepseek-ai/DeepGEMM.git /src\n" + GOOD_TAIL,
        GOOD_HEAD + "RUN git -C /src checkout main\n" + GOOD_TAIL,
        GOOD_HEAD + "ARG REF=v4.7.1\nRUN git fetch --depth 1 origin ${REF}\n" + GOOD_TAIL,
        GOOD_HEAD + "RUN git clone --branch v1.0 https://example.org/x.git\n" + GOOD_TAIL,
    ],
    "pipe-to-shell": [
        GOOD_HEAD + "RUN curl -fsSL https://sh.rustup.rs | sh -s -- -y\n" + GOOD_TAIL,
        GOOD_HEAD + "RUN wget -qO- https://example.org/install.sh | bash\n" + GOOD_TAIL,
        GOOD_HEAD + "RUN curl -LsSf https://astral.sh/uv/install.sh | sudo sh\n" + GOOD_TAIL,
    ],
    "download-hash": [
        GOOD_HEAD + "RUN curl -fsSLo /tmp/x.tar.gz https://example.org/x.tar.gz && tar xf /tmp/x.tar.gz\n"
        + GOOD_TAIL,
        GOOD_HEAD + "ADD https://example.org/x.tar.gz /tmp/\n" + GOOD_TAIL,
    ],
    "apt-pin": [
        GOOD_HEAD + "RUN apt-get update && apt-get install -y --no-install-recommends git\n" + GOOD_TAIL,
        GOOD_HEAD + 'ARG APT_PACKAGES="git curl=7.88.1-10"\nARG APT_SNAPSHOT=""\n'
        'RUN apt-get update ${APT_SNAPSHOT:+--snapshot "${APT_SNAPSHOT}"} '
        "&& apt-get install -y ${APT_PACKAGES}\n" + GOOD_TAIL,
    ],
    "non-root": [
        GOOD_HEAD,
        GOOD_HEAD + "USER root\n",
        GOOD_HEAD + "USER 0:0\n",
        GOOD_HEAD + "USER 10001\nFROM base AS final\n",
    ],
}


@pytest.mark.parametrize("rule,text", [(r, t) for r, ts in BAD.items() for t in ts])
def test_bad_examples_are_caught(tmp_path, rule, text):
    f = tmp_path / "Dockerfile"
    f.write_text(text)
    found = check_dockerfile(f)
    assert rule in {v.rule for v in found}, f"{rule} not caught in:\n{text}\ngot {[str(v) for v in found]}"


GOOD = [
    GOOD_HEAD + "RUN pip install --no-deps --require-hashes -r /tmp/lock.txt\n" + GOOD_TAIL,
    GOOD_HEAD + "RUN pip install --no-deps --no-index --no-build-isolation -e /opt/src\n" + GOOD_TAIL,
    GOOD_HEAD + "RUN pip install --no-deps --no-index /tmp/wheels/*.whl\n" + GOOD_TAIL,
    GOOD_HEAD + f"ARG REF={SHA}\nRUN git -C /src fetch --depth 1 origin ${{REF}} && git -C /src checkout {SHA}\n"
    + GOOD_TAIL,
    GOOD_HEAD + "RUN curl -fsSLo x.tgz https://example.org/x.tgz && echo \"abc  x.tgz\" | sha256sum -c -\n"
    + GOOD_TAIL,
    GOOD_HEAD + "RUN apt-get update && apt-get install -y --no-install-recommends libnuma1=2.0.16-1\n" + GOOD_TAIL,
    GOOD_HEAD + 'ARG APT_PACKAGES="git"\nARG APT_SNAPSHOT=20261120T000000Z\n'
    'RUN apt-get update ${APT_SNAPSHOT:+--snapshot "${APT_SNAPSHOT}"} && apt-get install -y ${APT_PACKAGES}\n'
    + GOOD_TAIL,
    f"ARG BASE=python:3.11-slim{DIGEST}\nARG BUILD=${{BASE}}\nFROM ${{BUILD}} AS b\nFROM b AS c\nUSER app\n",
]


@pytest.mark.parametrize("text", GOOD)
def test_pinned_examples_pass(tmp_path, text):
    f = tmp_path / "Dockerfile"
    f.write_text(text)
    assert [str(v) for v in check_dockerfile(f)] == []


def test_cli_exit_status_and_lines(tmp_path, capsys):
    bad = tmp_path / "Dockerfile"
    bad.write_text(textwrap.dedent("""\
        FROM debian:bookworm
        RUN curl https://example.org/i.sh | sh
        """))
    assert main([str(bad)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith(f"{bad}:1: base-digest:") for line in out)
    assert any(line.startswith(f"{bad}:2: pipe-to-shell:") for line in out)
    assert main([str(d) for d in DOCKERFILES]) == 0
