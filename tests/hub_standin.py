"""A local stand-in for `huggingface_hub.HfApi`: repos are folders under a root, every call is recorded.

In-process tests pass it to monkeypatch; CLI runs install it with a `sitecustomize.py` (see `SITECUSTOMIZE`).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil

ROOT_VARIABLE = "HUB_STANDIN_ROOT"

SITECUSTOMIZE = """
import os, sys
sys.path.insert(0, os.environ["HUB_STANDIN_REPO"])
import huggingface_hub
from tests.hub_standin import StandInHfApi
huggingface_hub.HfApi = StandInHfApi
"""


class StandInHfApi:
    """The few HfApi methods the trainer calls, storing files under $HUB_STANDIN_ROOT/<repo_type>/<repo_id>/."""

    def __init__(self, token: str | None = None, **_: object) -> None:
        self.token = token
        self.root = os.environ[ROOT_VARIABLE]

    def create_repo(
        self,
        repo_id: str,
        *,
        repo_type: str | None = None,
        private: bool | None = None,
        exist_ok: bool = False,
        **_: object,
    ) -> str:
        self._record("create_repo", repo_id=repo_id, repo_type=repo_type, private=private, exist_ok=exist_ok)
        os.makedirs(self._repo(repo_id, repo_type), exist_ok=True)
        return f"https://huggingface.co/{repo_id}"

    def upload_file(
        self, *, path_or_fileobj: str, path_in_repo: str, repo_id: str, repo_type: str | None = None, **_: object
    ) -> None:
        self._record("upload_file", repo_id=repo_id, repo_type=repo_type, path_in_repo=path_in_repo)
        target = os.path.join(self._repo(repo_id, repo_type), path_in_repo)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(path_or_fileobj, target)

    def upload_folder(
        self,
        *,
        repo_id: str,
        folder_path: str,
        path_in_repo: str | None = None,
        repo_type: str | None = None,
        **_: object,
    ) -> None:
        files = sorted(
            os.path.relpath(os.path.join(top, name), folder_path).replace(os.sep, "/")
            for top, _dirs, names in os.walk(folder_path)
            for name in names
        )
        self._record("upload_folder", repo_id=repo_id, repo_type=repo_type, path_in_repo=path_in_repo, files=files)
        shutil.copytree(
            folder_path, os.path.join(self._repo(repo_id, repo_type), path_in_repo or ""), dirs_exist_ok=True
        )

    def snapshot_download(
        self,
        repo_id: str,
        *,
        repo_type: str | None = None,
        revision: str | None = None,
        allow_patterns: list[str] | None = None,
        **_: object,
    ) -> str:
        self._record(
            "snapshot_download", repo_id=repo_id, repo_type=repo_type, revision=revision, allow_patterns=allow_patterns
        )
        source = self._repo(repo_id, repo_type)
        target = os.path.join(self.root, "downloads", repo_id.replace("/", "--"))
        shutil.copytree(
            source,
            target,
            dirs_exist_ok=True,
            ignore=lambda folder, names: [
                name
                for name in names
                if not _allowed(
                    os.path.relpath(os.path.join(folder, name), source),
                    allow_patterns,
                    os.path.isdir(os.path.join(folder, name)),
                )
            ],
        )
        return target

    def _repo(self, repo_id: str, repo_type: str | None) -> str:
        return os.path.join(self.root, repo_type or "model", repo_id)

    def _record(self, call: str, **values: object) -> None:
        values.update(call=call, token=self.token)
        with open(os.path.join(self.root, "calls.jsonl"), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(values) + "\n")


def _allowed(path: str, patterns: list[str] | None, is_folder: bool) -> bool:
    path = path.replace(os.sep, "/")
    if patterns is None:
        return True
    if is_folder:  # keep folders on the way to an allowed pattern
        return any(pattern.startswith(path + "/") or fnmatch.fnmatch(path, pattern) for pattern in patterns)
    return any(fnmatch.fnmatch(path, pattern) for pattern in patterns)


def read_calls(root: str) -> list[dict]:
    """The recorded calls, in order."""
    path = os.path.join(root, "calls.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def write_cached_repo(cache_root: str, repo_id: str, source_folder: str, revision: str = "0" * 40) -> str:
    """Lay `source_folder` out in a Hugging Face hub cache (`HF_HUB_CACHE`) as the snapshot of `repo_id`'s main
    branch, as a download would have left it (plain files instead of blob links); returns the snapshot folder."""
    repo = os.path.join(cache_root, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", revision)
    shutil.copytree(source_folder, snapshot, dirs_exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w", encoding="utf-8") as handle:
        handle.write(revision)
    return snapshot
