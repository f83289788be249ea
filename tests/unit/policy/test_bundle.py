"""policy.bundle: OPA bundle layout from a directory or a .tar.gz, rejected bundles with their exact messages,
the content revision, fingerprints for hot reload, reproducible tarballs."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from policy import bundle as bundle_module
from policy.bundle import build_tarball, fingerprint, load_bundle
from policy.engine import PolicyLoadError

POLICY = "package app.authz\n\nallow if input.user == data.app.admin\n"
TEST = "package app.authz_test\n\ntest_allow if data.app.authz.allow with input as {}\n"


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def tarball(path: Path, members: list[tarfile.TarInfo | tuple[str, str]]) -> Path:
    """A .tar.gz with exactly these members (``(name, text)`` for a regular file)."""
    with tarfile.open(path, "w:gz") as archive:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                archive.addfile(member)
            else:
                name, text = member
                info = tarfile.TarInfo(name)
                info.size = len(text.encode())
                archive.addfile(info, io.BytesIO(text.encode()))
    return path


# --------------------------------------------------------------------------------------------- layout


def test_directory_bundle_layout(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            ".manifest": json.dumps({"revision": "r42", "roots": ["app"]}),
            "app/authz/policy.rego": POLICY,
            "app/authz/policy_test.rego": TEST,
            "app/data.json": json.dumps({"admin": "alice"}),
            "app/lists/data.yaml": "blocked:\n  - mallory\n",
            "app/ids/data.json": "[1, 2]",
            "README.md": "ignored",
            ".hidden/x.rego": "package ignored",
        },
    )
    bundle = load_bundle(tmp_path)
    assert bundle.modules == (("app/authz/policy.rego", POLICY),)
    assert bundle.tests == (("app/authz/policy_test.rego", TEST),)
    assert bundle.data == {"app": {"admin": "alice", "lists": {"blocked": ["mallory"]}, "ids": [1, 2]}}
    assert (bundle.revision, bundle.rego_version, bundle.source, bundle.roots) == ("r42", 1, str(tmp_path), ("app",))


def test_root_data_json_and_nested_files_merge(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "p.rego": POLICY,
            "data.json": json.dumps({"app": {"admin": "alice"}, "top": 1}),
            "app/limits/data.json": json.dumps({"rps": 10}),
        },
    )
    assert load_bundle(tmp_path).data == {"app": {"admin": "alice", "limits": {"rps": 10}}, "top": 1}


def test_rego_version_zero_from_the_manifest(tmp_path: Path) -> None:
    write(tmp_path, {".manifest": '{"rego_version": 0}', "p.rego": "package a\nallow { true }\n"})
    assert load_bundle(tmp_path).rego_version == 0


def test_content_revision_is_a_hash_of_names_and_contents(tmp_path: Path) -> None:
    write(tmp_path, {"p.rego": POLICY})
    first = load_bundle(tmp_path).revision
    assert first.startswith("sha256:")
    assert len(first) == len("sha256:") + 16
    assert load_bundle(tmp_path).revision == first
    write(tmp_path, {"p.rego": POLICY + "\n"})
    assert load_bundle(tmp_path).revision != first
    (tmp_path / "p.rego").rename(tmp_path / "q.rego")
    write(tmp_path, {"q.rego": POLICY})
    assert load_bundle(tmp_path).revision not in (first, "")


def test_tarball_round_trip_gives_the_same_bundle(tmp_path: Path) -> None:
    source = write(tmp_path / "src", {"app/p.rego": POLICY, "app/p_test.rego": TEST, "app/data.json": '{"a": 1}'})
    out = tmp_path / "bundle.tar.gz"
    built = build_tarball(source, out)
    loaded = load_bundle(out)
    assert (loaded.modules, loaded.tests, loaded.data, loaded.revision) == (
        built.modules,
        built.tests,
        built.data,
        built.revision,
    )
    assert loaded.source == str(out)


def test_build_tarball_is_reproducible(tmp_path: Path) -> None:
    source = write(tmp_path / "src", {"p.rego": POLICY, "data.json": "{}"})
    build_tarball(source, tmp_path / "one.tar.gz")
    os.utime(source / "p.rego", (1, 1))
    build_tarball(source, tmp_path / "two.tar.gz")
    assert (tmp_path / "one.tar.gz").read_bytes() == (tmp_path / "two.tar.gz").read_bytes()


def test_build_tarball_refuses_a_broken_bundle(tmp_path: Path) -> None:
    source = write(tmp_path / "src", {"p.rego": POLICY, "data.json": "{"})
    with pytest.raises(PolicyLoadError, match=r"data\.json:1: invalid JSON"):
        build_tarball(source, tmp_path / "out.tar.gz")
    assert not (tmp_path / "out.tar.gz").exists()


def test_opa_build_style_member_names_load(tmp_path: Path) -> None:
    """`opa build` writes "/data.json", "/.manifest": one leading slash is OPA's layout."""
    path = tarball(
        tmp_path / "b.tar.gz",
        [
            ("/.manifest", '{"revision": "opa"}'),
            ("/data.json", '{"x": 1}'),
            ("/app/p.rego", POLICY),
            ("./q.rego", POLICY),
        ],
    )
    bundle = load_bundle(path)
    assert [name for name, _ in bundle.modules] == ["app/p.rego", "q.rego"]
    assert (bundle.data, bundle.revision) == ({"x": 1}, "opa")


# --------------------------------------------------------------------------------------------- rejected


def link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(
    ("member", "message"),
    [
        pytest.param(
            ("../evil.rego", POLICY),
            "../evil.rego: unsafe member name in bundle tarball (absolute, '..' or drive path)",
            id="dot-dot",
        ),
        pytest.param(
            ("a/../../evil.rego", POLICY),
            "a/../../evil.rego: unsafe member name in bundle tarball (absolute, '..' or drive path)",
            id="dot-dot-inside",
        ),
        pytest.param(
            ("//etc/evil.rego", POLICY),
            "//etc/evil.rego: unsafe member name in bundle tarball (absolute, '..' or drive path)",
            id="absolute",
        ),
        pytest.param(
            ("C:/evil.rego", POLICY),
            "C:/evil.rego: unsafe member name in bundle tarball (absolute, '..' or drive path)",
            id="drive",
        ),
        pytest.param(
            link("p.rego", "/etc/passwd", tarfile.SYMTYPE),
            "p.rego: bundle tarball member is a link; only regular files are allowed",
            id="symlink",
        ),
        pytest.param(
            link("q.rego", "p.rego", tarfile.LNKTYPE),
            "q.rego: bundle tarball member is a link; only regular files are allowed",
            id="hardlink",
        ),
        pytest.param(
            link("fifo.rego", "", tarfile.FIFOTYPE),
            "fifo.rego: bundle tarball member is a special file; only regular files are allowed",
            id="fifo",
        ),
    ],
)
def test_unsafe_tar_members_are_rejected(
    tmp_path: Path, member: tarfile.TarInfo | tuple[str, str], message: str
) -> None:
    path = tarball(tmp_path / "b.tar.gz", [("ok.rego", POLICY), member])
    with pytest.raises(PolicyLoadError) as caught:
        load_bundle(path)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("files", "message"),
    [
        pytest.param(
            {"p.rego": POLICY, "a/data.json": '{"x": }'},
            "a/data.json:1: invalid JSON: Expecting value",
            id="bad-json",
        ),
        pytest.param(
            {"p.rego": POLICY, "data.yaml": "a: [1,\n"},
            "data.yaml:2: invalid YAML: expected the node content, but found '<stream end>'",
            id="bad-yaml",
        ),
        pytest.param(
            {"p.rego": POLICY, "data.json": "[1]"},
            "data.json: must hold an object (it is the whole data document)",
            id="root-data-not-object",
        ),
        pytest.param(
            {"p.rego": POLICY, ".manifest": "{"},
            ".manifest:1: invalid JSON: Expecting property name enclosed in double quotes",
            id="bad-manifest",
        ),
        pytest.param(
            {"p.rego": POLICY, ".manifest": "[]"}, ".manifest: must hold a JSON object", id="manifest-not-object"
        ),
        pytest.param(
            {"p.rego": POLICY, ".manifest": '{"rego_version": 2}'},
            ".manifest: rego_version must be 0 or 1, not 2",
            id="rego-version",
        ),
        pytest.param(
            {"p.rego": POLICY, ".manifest": '{"revision": 7}'},
            ".manifest: revision must be a string, not 7",
            id="revision-type",
        ),
        pytest.param(
            {"p.rego": POLICY, ".manifest": '{"roots": "app"}'},
            ".manifest: roots must be a list of strings",
            id="roots-type",
        ),
        pytest.param(
            {"p.rego": POLICY, "a/data.json": '{"b": 1}', "a/b/data.json": '{"c": 2}'},
            "a/data.json: data path data.a.b conflicts with a/b/data.json",
            id="conflicting-data-paths",
        ),
        pytest.param(
            {"p.rego": POLICY, "data.json": '{"a": {"b": 1}}', "a/data.json": '{"b": 2}'},
            "data.json: data path data.a.b conflicts with a/data.json",
            id="conflicting-values",
        ),
        pytest.param(
            {"app/p.rego": POLICY, ".manifest": '{"roots": ["app"]}', "other/data.json": "{}"},
            "other/data.json: data path data.other is outside the manifest roots ['app']",
            id="data-outside-roots",
        ),
        pytest.param(
            {"p.rego": "package other\nallow := true\n", ".manifest": '{"roots": ["app"]}'},
            "p.rego: package other is outside the manifest roots ['app']",
            id="package-outside-roots",
        ),
        pytest.param(
            {
                "app/p.rego": POLICY,
                "app/p_test.rego": "package app_test\ntest_x := true\n",
                ".manifest": '{"roots": ["app"]}',
            },
            # OPA loads test files as modules: it would refuse this bundle, so meshgate does too.
            "app/p_test.rego: package app_test is outside the manifest roots ['app']",
            id="test-package-outside-roots",
        ),
    ],
)
def test_rejected_bundles_name_the_file(tmp_path: Path, files: dict[str, str], message: str) -> None:
    write(tmp_path, files)
    with pytest.raises(PolicyLoadError) as caught:
        load_bundle(tmp_path)
    assert str(caught.value) == message


def test_a_policy_that_is_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "p.rego").write_bytes(b"package a\n\xff\n")
    with pytest.raises(PolicyLoadError) as caught:
        load_bundle(tmp_path)
    assert str(caught.value) == "p.rego: not UTF-8 text (byte 10)"


def test_a_bundle_without_policies_is_rejected(tmp_path: Path) -> None:
    write(tmp_path, {"p_test.rego": TEST, "data.json": "{}"})
    with pytest.raises(PolicyLoadError) as caught:
        load_bundle(tmp_path)
    assert str(caught.value) == (
        f"{tmp_path}: bundle has no .rego policy files (files ending in _test.rego do not count)"
    )


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(PolicyLoadError) as caught:
        load_bundle(tmp_path / "nope")
    assert str(caught.value) == f"{tmp_path / 'nope'}: no such bundle directory or file"


def test_a_file_that_is_not_a_tarball(tmp_path: Path) -> None:
    path = tmp_path / "b.tar.gz"
    path.write_text("not gzip")
    with pytest.raises(PolicyLoadError, match=r"b\.tar\.gz: not a readable \.tar\.gz bundle: "):
        load_bundle(path)


def test_size_limit_is_checked_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundle_module, "MAX_BUNDLE_BYTES", 100)
    path = tarball(tmp_path / "b.tar.gz", [("p.rego", POLICY), ("big.rego", "#" * 200)])
    with pytest.raises(PolicyLoadError) as caught:
        load_bundle(path)
    assert str(caught.value) == "big.rego: bundle is larger than 0 MiB uncompressed"
    write(tmp_path / "dir", {"p.rego": POLICY, "q.rego": "#" * 200})
    with pytest.raises(PolicyLoadError, match="bundle is larger than"):
        load_bundle(tmp_path / "dir")


# --------------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_of_a_directory_changes_with_its_files(tmp_path: Path) -> None:
    write(tmp_path, {"p.rego": POLICY})
    first = fingerprint(tmp_path)
    assert fingerprint(tmp_path) == first
    write(tmp_path, {"p.rego": POLICY + "# more\n"})
    second = fingerprint(tmp_path)
    assert second != first
    write(tmp_path, {"sub/data.json": "{}"})
    assert fingerprint(tmp_path) != second


def test_fingerprint_of_a_tarball_and_of_nothing(tmp_path: Path) -> None:
    source = write(tmp_path / "src", {"p.rego": POLICY})
    out = tmp_path / "b.tar.gz"
    build_tarball(source, out)
    first = fingerprint(out)
    os.utime(out, ns=(1_000_000_000, 1_000_000_000))
    assert fingerprint(out) != first
    assert fingerprint(tmp_path / "gone") == "absent"
