"""Hugging Face Hub: upload of every saved result (and state, when asked) and download of a state to resume from.

All hub calls go through `make_api`, one `huggingface_hub.HfApi`; nothing here touches the network unless a repo id
or `--resume_from_huggingface` was given. The token is handed to the API only: it is never logged or written.
"""

from __future__ import annotations

import argparse
import logging
import os
import posixpath
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from library.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

REPO_TYPES = ("model", "dataset", "space")
RESUME_FORMAT = "<owner>/<repo>/<path of the state folder>[:<revision>[:<repo type>]]"


def add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    """Options for uploading to and resuming from the Hugging Face Hub."""
    parser.add_argument(
        "--huggingface_repo_id", type=str, default=None, help="upload every saved result to this repo (owner/name)"
    )
    parser.add_argument(
        "--huggingface_path_in_repo", type=str, default=None, help="folder inside the repo (default: its root)"
    )
    parser.add_argument(
        "--huggingface_repo_type", type=str, default=None, choices=REPO_TYPES, help="repo type (default: model)"
    )
    parser.add_argument(
        "--huggingface_repo_visibility",
        type=str,
        default=None,
        help="visibility of a repo created for the upload: public, or private (the default; any other value)",
    )
    parser.add_argument(
        "--huggingface_token", type=str, default=None, help="hub access token (never logged or written anywhere)"
    )
    parser.add_argument("--async_upload", action="store_true", help="upload in the background while training goes on")
    parser.add_argument(
        "--save_state_to_huggingface",
        action="store_true",
        help="also upload the training states written by --save_state / --save_state_on_train_end",
    )
    parser.add_argument(
        "--resume_from_huggingface",
        action="store_true",
        help=f"--resume names a state folder on the hub: {RESUME_FORMAT}",
    )


@dataclass
class HubOptions:
    """Typed hub options. `token` is kept out of repr so it never lands in a log line."""

    repo_id: str | None = None
    path_in_repo: str | None = None
    repo_type: str | None = None
    visibility: str | None = None
    token: str | None = field(default=None, repr=False)
    async_upload: bool = False
    save_state_to_huggingface: bool = False
    resume_from_huggingface: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> HubOptions:
        options = cls(
            repo_id=args.huggingface_repo_id,
            path_in_repo=args.huggingface_path_in_repo,
            repo_type=args.huggingface_repo_type,
            visibility=args.huggingface_repo_visibility,
            token=args.huggingface_token,
            async_upload=args.async_upload,
            save_state_to_huggingface=args.save_state_to_huggingface,
            resume_from_huggingface=args.resume_from_huggingface,
        )
        options.validate(args.save_state or args.save_state_on_train_end, args.resume)
        return options

    @property
    def private(self) -> bool:
        return self.visibility != "public"

    def validate(self, saves_state: bool, resume: str | None) -> None:
        """Every combination problem, before anything is loaded or downloaded."""
        if self.repo_id is None:
            for name, value in (
                ("huggingface_path_in_repo", self.path_in_repo),
                ("huggingface_repo_type", self.repo_type),
                ("huggingface_repo_visibility", self.visibility),
                ("async_upload", self.async_upload),
                ("save_state_to_huggingface", self.save_state_to_huggingface),
            ):
                if value:
                    raise ConfigError(f"--{name} needs --huggingface_repo_id (the repo to upload to)")
        else:
            _check_repo_id(self.repo_id, "--huggingface_repo_id")
        if self.save_state_to_huggingface and not saves_state:
            raise ConfigError("--save_state_to_huggingface needs --save_state or --save_state_on_train_end")
        if self.resume_from_huggingface:
            if not resume:
                raise ConfigError(f"--resume_from_huggingface needs --resume {RESUME_FORMAT}")
            parse_hub_state(resume)
        if self.visibility not in (None, "public", "private"):
            logger.warning("--huggingface_repo_visibility %r is not 'public': the repo is private", self.visibility)
        if self.token and self.repo_id is None and not self.resume_from_huggingface:
            logger.warning("--huggingface_token is ignored: no --huggingface_repo_id or --resume_from_huggingface")

    def local_resume(self, resume: str | None) -> str | None:
        """The local state folder for --resume: downloaded from the hub with --resume_from_huggingface."""
        if not self.resume_from_huggingface or resume is None:
            return resume
        return download_state(parse_hub_state(resume), self.token)


def _check_repo_id(repo_id: str, option: str) -> None:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as err:
        raise ConfigError(f"{option} {repo_id!r} is not a repo id like owner/name: {err}") from None


def make_api(token: str | None):
    """The hub client (tests replace `huggingface_hub.HfApi` with a local stand-in)."""
    from huggingface_hub import HfApi

    return HfApi(token=token)


@dataclass(frozen=True)
class HubState:
    """Where a training state lives on the hub."""

    repo_id: str
    path_in_repo: str
    revision: str | None
    repo_type: str


def parse_hub_state(text: str) -> HubState:
    """Parse `owner/repo/path/to/state[:revision[:repo_type]]` (the --resume form with --resume_from_huggingface)."""
    parts = text.split(":")
    location = parts[0].strip("/").split("/")
    if len(parts) > 3 or len(location) < 2 or not all(location):
        raise ConfigError(
            f"--resume {text!r}: with --resume_from_huggingface write {RESUME_FORMAT}, "
            "e.g. me/my-lora/my_lora-000002-state:main:model"
        )
    repo_id = "/".join(location[:2])
    _check_repo_id(repo_id, "--resume")
    revision = parts[1] if len(parts) > 1 and parts[1] else None
    repo_type = parts[2] if len(parts) > 2 and parts[2] else "model"
    if repo_type not in REPO_TYPES:
        raise ConfigError(f"--resume {text!r}: repo type {repo_type!r} is not one of {', '.join(REPO_TYPES)}")
    return HubState(repo_id, "/".join(location[2:]), revision, repo_type)


def download_state(state: HubState, token: str | None) -> str:
    """Download a state folder into the hub cache (a second run reuses it) and return its local path."""
    from huggingface_hub.errors import HfHubHTTPError

    patterns = [f"{state.path_in_repo}/*"] if state.path_in_repo else None
    where = f"{state.repo_id}/{state.path_in_repo} ({state.repo_type}, revision {state.revision or 'main'})"
    logger.info("downloading the training state %s from the hub", where)
    try:
        root = make_api(token).snapshot_download(
            state.repo_id, repo_type=state.repo_type, revision=state.revision, allow_patterns=patterns
        )
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise ConfigError(f"--resume: cannot download {where}: {err}") from None
    folder = os.path.join(root, *state.path_in_repo.split("/")) if state.path_in_repo else root
    if not os.path.isdir(folder):
        raise ConfigError(f"--resume: the hub repo {state.repo_id} has no folder {state.path_in_repo!r}")
    return folder


class Uploader:
    """Uploads saved files and folders to one repo, in order, either at once or on a background thread.

    A failed upload is logged and does not stop training (the file is saved locally); `finish` reports failures.
    """

    def __init__(self, options: HubOptions | None = None, main_process: bool = True) -> None:
        self.options = options if options is not None and options.repo_id and main_process else None
        self.failed: list[str] = []
        self._api = None
        self._repo_ready = False
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    def upload_result(self, path: str) -> None:
        """Upload a saved result (a model file or a diffusers folder)."""
        if self.options is not None:
            self._submit(path)

    def upload_state(self, path: str) -> None:
        """Upload a state folder when --save_state_to_huggingface is on."""
        if self.options is not None and self.options.save_state_to_huggingface:
            self._submit(path)

    def finish(self) -> None:
        """Wait for background uploads; raise if any upload failed."""
        for future in self._pending:
            future.result()
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None
        if self.failed:
            raise UserError(
                f"{len(self.failed)} upload(s) to the hub repo {self.options.repo_id} failed (see the errors above): "
                f"{', '.join(self.failed)}. The files are saved locally; upload them with `hf upload`"
            )

    def path_in_repo(self, path: str) -> str:
        return posixpath.join(self.options.path_in_repo or "", os.path.basename(os.path.normpath(path)))

    def _submit(self, path: str) -> None:
        if not self.options.async_upload:
            self._upload(path, path)
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-upload")
        # Upload a hard-linked snapshot: a --save_last_n_* cleanup may remove the file before its turn comes.
        snapshot = _snapshot(path)
        self._pending.append(self._executor.submit(self._upload_snapshot, path, snapshot))

    def _upload_snapshot(self, path: str, snapshot: str) -> None:
        try:
            self._upload(path, os.path.join(snapshot, os.path.basename(os.path.normpath(path))))
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)

    def _upload(self, path: str, source: str) -> None:
        options, destination = self.options, self.path_in_repo(path)
        try:
            api = self._ensure_repo()
            common = {"repo_id": options.repo_id, "repo_type": options.repo_type, "path_in_repo": destination}
            if os.path.isdir(source):
                api.upload_folder(folder_path=source, **common)
            else:
                api.upload_file(path_or_fileobj=source, **common)
        # An upload failure must not end a long run; the file is on disk and finish() reports it.
        except Exception as err:  # noqa: BLE001
            self.failed.append(path)
            logger.error("upload of %s to the hub repo %s failed: %s", path, options.repo_id, err)
            return
        logger.info("uploaded %s to %s/%s", path, options.repo_id, destination)

    def _ensure_repo(self):
        if self._api is None:
            self._api = make_api(self.options.token)
        if not self._repo_ready:
            # exist_ok keeps an existing repo as it is (its visibility is not changed)
            self._api.create_repo(
                self.options.repo_id, repo_type=self.options.repo_type, private=self.options.private, exist_ok=True
            )
            self._repo_ready = True
        return self._api


def _snapshot(path: str) -> str:
    """Hard links of `path` (file or folder) in a hidden temporary folder beside it; copies where links fail."""
    snapshot = tempfile.mkdtemp(prefix=".upload-", dir=os.path.dirname(os.path.abspath(path)))
    target = os.path.join(snapshot, os.path.basename(os.path.normpath(path)))
    if os.path.isdir(path):
        shutil.copytree(path, target, copy_function=_link_or_copy)
    else:
        _link_or_copy(path, target)
    return snapshot


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
