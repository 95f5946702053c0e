"""The SPANK plugin: it builds, exports what Slurm looks for, checks values as
p2pcast does, and srun/sbatch/salloc show and enforce its options.

No controller is needed: ``--help`` and the option checks happen in the
client before it contacts slurmctld; a value that passes gets as far as
"Unable to contact slurm controller" (a closed port on 127.0.0.1).
"""

from __future__ import annotations

import ctypes
import os
import random
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pcast import jobspec
from p2pcast.errors import UserError
from tests.helpers_node import closed_port
from tests.test_stage_support import need

SLURM_DIR = Path(__file__).resolve().parent.parent / "slurm"
SOURCE = SLURM_DIR / "spank_p2pcast.c"

#: A client that cannot reach the controller gives up after MessageTimeout
#: (1 s here) and a retry or two; this only turns a hang into a failure.
CLIENT_TIMEOUT = 30.0

SPANK_SYMBOLS = {
    "slurm_spank_init",
    "slurm_spank_init_post_opt",
    "slurm_spank_task_init",
    "plugin_name",
    "plugin_type",
    "plugin_version",
    "spank_plugin_version",
}


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need(shutil.which("gcc") is not None and shutil.which("make") is not None, "gcc and make")
    need(os.path.exists("/usr/include/slurm/spank.h"), "slurm/spank.h (apt libslurm-dev)")
    build = tmp_path_factory.mktemp("spank")
    # -Werror is in the Makefile: a warning fails the build, and this test.
    subprocess.run(
        ["make", "-C", str(SLURM_DIR), f"BUILD={build}"], check=True, capture_output=True
    )
    return build / "spank_p2pcast.so"


def test_exports_the_spank_entry_points(plugin: Path) -> None:
    out = subprocess.run(
        ["nm", "-D", "--defined-only", str(plugin)], check=True, capture_output=True, text=True
    ).stdout
    exported = {line.split()[-1] for line in out.splitlines()}
    assert exported >= SPANK_SYMBOLS
    # Nothing of libslurm is linked in: the loading program provides it.
    undefined = subprocess.run(
        ["nm", "-D", "--undefined-only", str(plugin)], check=True, capture_output=True, text=True
    ).stdout
    assert "spank_option_register" in undefined and "slurm_error" in undefined


def test_limits_match_the_python_side() -> None:
    defines = dict(re.findall(r"#define (MAX_\w+) (\d+)", SOURCE.read_text()))
    assert int(defines["MAX_MOUNTS"]) == jobspec.MAX_MOUNTS
    assert int(defines["MAX_PATH_LEN"]) == jobspec.MAX_PATH_LEN
    assert int(defines["MAX_MOUNT_SPEC"]) == jobspec.MAX_MOUNT_SPEC
    name, tag = int(defines["MAX_NAME_LEN"]), int(defines["MAX_TAG_LEN"])
    assert name + 1 + tag == jobspec.MAX_IMAGE_SPEC


class _Checks:
    """The plugin's value checks, called through ctypes (Slurm's symbols stay unresolved)."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path), mode=os.RTLD_LAZY | os.RTLD_LOCAL)
        self.image_fn = lib.p2pcast_check_image
        self.mounts_fn = lib.p2pcast_check_mounts
        for fn in (self.image_fn, self.mounts_fn):
            fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]
            fn.restype = ctypes.c_int

    @staticmethod
    def _call(fn: Any, text: str) -> str | None:
        why = ctypes.create_string_buffer(256)
        return None if fn(text.encode(), why, len(why)) == 0 else why.value.decode()

    def image(self, text: str) -> str | None:
        return self._call(self.image_fn, text)

    def mounts(self, text: str) -> str | None:
        return self._call(self.mounts_fn, text)


@pytest.fixture(scope="module")
def checks(plugin: Path) -> _Checks:
    return _Checks(plugin)


def _python_accepts(parse: object, text: str) -> bool:
    try:
        parse(text)  # type: ignore[operator]
    except UserError:
        return False
    return True


IMAGES = [
    "x", "hpc/pytorch:2.3", "a/b/c:_t", "A1.b-c_d/e", "x:latest", "9/9:9",
    "", ":t", "x:", "x:a:b", "/x", "x/", "x//y", ".x", "x/.y", "-x", "x/../y", "../x",
    "x y", "x:.t", "x:-t", "x:t/u", "s3://b/x", "file:///etc", "é", "x:" + "t" * 128,
    "x:" + "t" * 129, "n" * 1024, "n" * 1025, "n" * 1024 + ":" + "t" * 128,
]  # fmt: skip
MOUNTS = [
    "", "/a:/b", "/a:/b,/c/d:/e/f", "/a/:/b/", "//a:/b", "/a.:/..b", "/a:/b/./c",
    "/a", "a:/b", "/a:b", "/a:/b:/c", "/a:/b,", ",/a:/b", "/a:/", "/:/b", "/a:///",
    "/a/..:/b", "/a:/b/../c", "/a\n:/b", "/a:/b\x7f", "/a b:/c d",
    "/" + "x" * 4095 + ":/b", "/" + "x" * 4096 + ":/b", ",".join(["/a:/b"] * 64),
    ",".join(["/a:/b"] * 65), "/a:/" + "b" * 16382, "/a:/" + "b" * 16381,
]  # fmt: skip


@pytest.mark.parametrize("text", IMAGES)
def test_image_check_agrees_with_python(checks: _Checks, text: str) -> None:
    assert (checks.image(text) is None) == _python_accepts(jobspec.parse_image, text), text


@pytest.mark.parametrize("text", MOUNTS)
def test_mount_check_agrees_with_python(checks: _Checks, text: str) -> None:
    assert (checks.mounts(text) is None) == _python_accepts(jobspec.parse_mounts, text), text


def test_checks_agree_on_random_strings(checks: _Checks) -> None:
    rng = random.Random(7)
    atoms = ["a", "B", "7", ".", "..", "_", "-", "/", ":", ",", " ", "\t", "é", "://", "latest"]
    for _ in range(3000):
        text = "".join(rng.choices(atoms, k=rng.randrange(0, 12)))
        pairs = ((checks.image, jobspec.parse_image), (checks.mounts, jobspec.parse_mounts))
        for check, parse in pairs:
            assert (check(text) is None) == _python_accepts(parse, text), repr(text)
    assert "letter or digit" in (checks.image("../x") or "")
    assert "contains '..'" in (checks.mounts("/a:/b/../c") or "")


# ---- the Slurm clients -------------------------------------------------------------


@pytest.fixture
def slurm_conf(tmp_path: Path, plugin: Path) -> Iterator[dict[str, str]]:
    need(shutil.which("srun") is not None, "srun (apt slurm-client)")
    conf = tmp_path / "slurm.conf"
    plugstack = tmp_path / "plugstack.conf"
    conf.write_text(
        "ClusterName=p2pcasttest\n"
        f"SlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort={closed_port()}\n"
        f"PlugStackConfig={plugstack}\nMessageTimeout=1\n"
        "NodeName=n1 CPUs=1\nPartitionName=p Nodes=n1 Default=yes\n"
    )
    fake = tmp_path / "p2pcast"
    fake.write_text(
        "#!/bin/sh\n"
        'echo "$*" >> "$(dirname "$0")/calls"\n'
        'case "$2" in\n'
        '  nosuch*) echo "p2pcast: error: no image $2 at the origin" >&2; exit 2;;\n'
        '  down*) echo "p2pcast: error: origin unavailable" >&2; exit 3;;\n'
        "esac\n"
    )
    fake.chmod(0o755)
    plugstack.write_text(
        f"required {plugin} run_dir={tmp_path}/run check_image={fake} origin=file:///srv/o\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "P2PCAST_"))}
    yield {**env, "SLURM_CONF": str(conf)}


def _client(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), env=env, capture_output=True, text=True, timeout=CLIENT_TIMEOUT, check=False
    )


@pytest.mark.parametrize("client", ["srun", "sbatch", "salloc"])
def test_help_lists_the_options(slurm_conf: dict[str, str], client: str) -> None:
    out = _client(slurm_conf, client, "--help")
    text = out.stdout + out.stderr
    assert "--ch-image=NAME[:TAG]" in text and "--ch-mount=SRC:DST[,SRC:DST...]" in text, text
    assert "P2PCAST_CH_IMAGE" in text


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--ch-image=../x"], {}, "every segment must start with a letter or digit"),
        (["--ch-image=s3://b/x"], {}, "images come from the site's origin"),
        (["--ch-image=x", "--ch-mount=data:/data"], {}, "SRC is not an absolute path"),
        (["--ch-image=x", "--ch-mount=/d:/a/../b"], {}, "DST contains '..'"),
        ([], {"P2PCAST_CH_IMAGE": "x y"}, "P2PCAST_CH_IMAGE: bad image"),
        ([], {"P2PCAST_CH_IMAGE": "x", "P2PCAST_CH_MOUNT": "/a"}, "expected SRC:DST"),
        (["--ch-mount=/a:/b"], {}, "--ch-mount needs --ch-image"),
        (["--ch-image=nosuch/img"], {}, "--ch-image nosuch/img: no image nosuch/img"),
    ],
    ids=["name", "url", "relative", "dotdot", "env-image", "env-mount", "no-image", "unknown"],
)
def test_bad_values_fail_at_submission(
    slurm_conf: dict[str, str], args: list[str], env: dict[str, str], message: str
) -> None:
    out = _client({**slurm_conf, **env}, "sbatch", *args, "--wrap", "true")
    assert out.returncode != 0
    assert message in out.stderr, out.stderr
    assert "contact slurm controller" not in out.stderr  # refused before submission


@pytest.mark.parametrize("image", ["hpc/good:1", "down/origin"])
def test_good_values_reach_the_controller(
    slurm_conf: dict[str, str], tmp_path: Path, image: str
) -> None:
    out = _client(
        slurm_conf, "sbatch", f"--ch-image={image}", "--ch-mount=/tmp:/data", "--wrap", "true"
    )
    # Accepted: the submission itself fails only for want of a controller. An
    # origin that is down is not the user's fault: the Prolog decides later.
    assert "Unable to contact slurm controller" in out.stderr, out.stderr
    assert (tmp_path / "calls").read_text().splitlines() == [
        f"inspect {image} --json --origin file:///srv/o"
    ]


def test_a_bad_plugstack_argument_is_named(slurm_conf: dict[str, str], plugin: Path) -> None:
    plugstack = Path(slurm_conf["SLURM_CONF"]).with_name("plugstack.conf")
    plugstack.write_text(f"required {plugin} chrun=/usr/bin/ch-run\n")
    out = _client(slurm_conf, "srun", "--help")
    assert out.returncode != 0
    assert "unknown plugstack.conf argument 'chrun=/usr/bin/ch-run'" in out.stderr


# ---- the task: slurm_spank_task_init execs ch-run ----------------------------------

HARNESS = Path(__file__).resolve().parent / "spank_harness.c"
NOBODY = 65534
#: Host programs copied (with their libraries) into the test image.
IMAGE_PROGRAMS = ("/bin/sh",)


def _copy_with_libraries(program: str, root: Path) -> None:
    ldd = subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout
    paths = [program, *re.findall(r"(/\S+\.so[.\d]*)", ldd)]
    for path in paths:
        dest = root / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)


@pytest.fixture(scope="module")
def task_world(plugin: Path) -> Iterator[dict[str, Path]]:
    """A harness, a tiny image and a run directory, all readable by nobody."""
    need(os.geteuid() == 0, "root (to run the task as another user)")
    need(shutil.which("ch-run") is not None, "ch-run (apt charliecloud-runtime)")
    need(shutil.which("setpriv") is not None, "setpriv (util-linux)")
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="p2pcast-spank-"))
    try:
        top.chmod(0o755)
        harness = top / "harness"
        subprocess.run(
            ["gcc", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-rdynamic",
             "-o", str(harness), str(HARNESS), "-ldl"],
            check=True, capture_output=True,
        )  # fmt: skip
        shutil.copy2(plugin, top / plugin.name)  # where nobody can read it
        root = top / "image"
        for sub in ("etc", "data", "tmp", "dev", "proc", "sys", "home"):
            (root / sub).mkdir(parents=True)
        for program in IMAGE_PROGRAMS:
            _copy_with_libraries(program, root)
        (root / "etc" / "passwd").write_text("root:x:0:0::/:/bin/sh\n")
        (root / "etc" / "group").write_text("root:x:0:\n")
        (root / "etc" / "marker").write_text("in-the-image\n")
        host_data = top / "host-data"
        host_data.mkdir()
        (host_data / "marker").write_text("bound-from-host\n")
        for path in [top, *top.rglob("*")]:
            path.chmod(
                path.stat().st_mode | 0o555 if path.is_dir() else path.stat().st_mode | 0o444
            )
        yield {
            "top": top,
            "harness": harness,
            "root": root,
            "data": host_data,
            "plugin": top / plugin.name,
        }
    finally:
        shutil.rmtree(top)


def _task(
    world: dict[str, Path], job: int, step: int, command: list[str], image: str | None = None
) -> subprocess.CompletedProcess[str]:
    ch_run = shutil.which("ch-run")
    argv = [
        "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
        str(world["harness"]), str(world["plugin"]), str(job), str(step),
        *(["--image", image] if image else []),
        f"run_dir={world['top'] / 'run'}", f"ch_run={ch_run}", "--", *command,
    ]  # fmt: skip
    # No USER: the plugin must add it (ch-run refuses to start without it).
    env = {"PATH": "/usr/bin:/bin", "HOME": "/"}
    return subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=CLIENT_TIMEOUT, check=False
    )


#: spank_p2pcast.c's TASK_FAILED: a task that cannot run in its image ends its own
#: process with it (a -1 from an "optional" plugin would be ignored by Slurm).
TASK_FAILED = 1

SHOW = 'read a < /etc/marker; read b < /data/marker; echo "$a $b $USER"'
BATCH_SCRIPT_STEP = 0xFFFFFFFB


def test_task_runs_in_the_staged_image(task_world: dict[str, Path]) -> None:
    from p2pcast import jobrecord

    run = task_world["top"] / "run"
    jobrecord.write_staged(
        run, "71", "hpc/x:latest", task_world["root"], [f"{task_world['data']}:/data"]
    )
    out = _task(task_world, 71, 0, ["/bin/sh", "-c", SHOW])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "in-the-image bound-from-host nobody"
    # srun made the command absolute on the submission host; the image has
    # it elsewhere (or not there): ch-run searches the image's PATH instead.
    out = _task(task_world, 71, 1, ["/opt/host-only/sh", "-c", "echo found"], image="hpc/x")
    assert (out.returncode, out.stdout.strip()) == (0, "found"), out.stderr
    # The batch script itself runs on the node as usual: no exec.
    out = _task(task_world, 71, BATCH_SCRIPT_STEP, ["/bin/true"])
    assert (out.returncode, out.stdout.strip()) == (0, "returned 0"), out.stderr
    # One image per job: a step cannot ask for another.
    out = _task(task_world, 71, 2, ["/bin/true"], image="hpc/other:1")
    assert out.returncode == TASK_FAILED
    assert "asks for --ch-image hpc/other:1 but job 71 staged hpc/x:latest" in out.stderr


def test_task_fails_with_the_recorded_error(task_world: dict[str, Path]) -> None:
    from p2pcast import jobrecord

    run = task_world["top"] / "run"
    jobrecord.write_failed(run, "72", "nosuch", "no image nosuch:latest at the origin")
    out = _task(task_world, 72, 0, ["/bin/true"])
    assert out.returncode == TASK_FAILED
    assert "error: p2pcast: no image nosuch:latest at the origin" in out.stderr
    # No record: a job without an image runs as usual, a step asking for one fails.
    assert _task(task_world, 73, 0, ["/bin/true"]).stdout.strip() == "returned 0"
    out = _task(task_world, 73, 0, ["/bin/true"], image="hpc/x")
    assert out.returncode == TASK_FAILED and "no staging record" in out.stderr
