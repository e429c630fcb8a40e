"""Upload a finished `compressm train` output folder (model, tokenizer, card, metrics, remote code) to the Hugging Face
Hub in one commit, through transformers' `PushToHubMixin.push_to_hub`.

`model.push_to_hub` alone would upload only what `model.save_pretrained` writes; the output folder also holds the
tokenizer and the run's metrics, so the folder itself is pushed: `push_to_hub` creates the repo, asks the Hub for its
current card, "saves" by copying the folder into its upload folder and commits every file. The CompreSSM card of the
folder replaces the Hub's card unless that one was written by hand (the rule `save_pretrained` follows).
"""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

from transformers.utils import PushToHubMixin

__all__ = ["push_folder_to_hub", "check_hub_access", "upload_names", "HubUploadError"]


def upload_names(folder: str) -> list[str]:
    """The files of `folder` an upload sends: those its manifest says compressm wrote (the user's own files in an
    output folder stay local), or every file of a folder without a manifest."""
    from .output_folder import MANIFEST_FILE, read_manifest

    manifest = read_manifest(folder)
    names = sorted(manifest) if manifest is not None else sorted(os.listdir(folder))
    return [name for name in names if name != MANIFEST_FILE and os.path.isfile(os.path.join(folder, name))]


class _FolderUpload(PushToHubMixin):
    """`PushToHubMixin` over a folder written earlier: `save_pretrained` copies its files (see `upload_names`)."""

    def __init__(self, folder: str):
        self.folder = folder

    def save_pretrained(self, save_directory, **kwargs):
        for name in upload_names(self.folder):
            shutil.copy2(os.path.join(self.folder, name), os.path.join(save_directory, name))
        return sorted(os.listdir(save_directory))

    def _upload_modified_files(self, working_dir, *args, **kwargs):
        # push_to_hub has just written the Hub's card (or transformers' placeholder) over README.md
        from ..model_card import is_replaceable_card

        ours = os.path.join(self.folder, "README.md")
        target = os.path.join(working_dir, "README.md")
        if os.path.isfile(ours) and is_replaceable_card(target):
            shutil.copy2(ours, target)
        return super()._upload_modified_files(working_dir, *args, **kwargs)


class HubUploadError(RuntimeError):
    """The upload at the end of a run failed after the output folder was saved. `summary` is the run's summary (the
    model under "model", the folder under "output_dir"); the message is one line saying where the model is and how
    to upload it later."""

    def __init__(self, repo_id: str, folder: str, cause: BaseException, summary: dict | None = None):
        self.repo_id, self.folder, self.summary = repo_id, folder, summary
        super().__init__(
            f"the upload to the Hub repo {repo_id!r} failed ({_describe(cause)}); the model is saved in {folder}: "
            f"upload it later with python -c \"from modeling_compressm.app.publish import push_folder_to_hub; "
            f"push_folder_to_hub('{folder}', '{repo_id}')\""
        )


def _describe(error: BaseException) -> str:
    from .tokenization import first_line

    return f"{type(error).__name__}: {first_line(error)}"


def _hub_api():
    """What transformers' `push_to_hub` creates repos through (its shared HfApi, or the module functions of earlier
    releases), so a check before training meets the same Hub as the upload."""
    from transformers.utils import hub

    if hasattr(hub, "hf_api"):  # transformers >= 5.10
        return hub.hf_api()
    return SimpleNamespace(create_repo=hub.create_repo)


def check_hub_access(repo_id: str | None = None, private: bool | None = None) -> None:
    """Raise ValueError (one line) when an upload cannot work: offline mode, no Hugging Face token, and, with
    `repo_id`, a Hub that cannot be reached or a repo that cannot be created (the repo is created here, as the
    upload would create it: run this just before training, after the other checks)."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise ValueError("--push-to-hub needs the Hugging Face Hub, but offline mode is on (HF_HUB_OFFLINE=1)")
    if not get_token():
        raise ValueError("--push-to-hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN")
    if repo_id is None:
        return
    try:
        _hub_api().create_repo(repo_id, private=private, exist_ok=True)
    except Exception as error:  # network, authentication and permission errors come in many types
        raise ValueError(
            f"--push-to-hub: could not create the Hub repo {repo_id!r} before training ({_describe(error)}); check "
            "the network, your token (`hf auth whoami`) and the repo id, or train without --push-to-hub"
        ) from None


def push_folder_to_hub(folder: str, repo_id: str, *, private: bool | None = None, token: str | None = None,
                       commit_message: str = "Upload CompreSSM model") -> str:
    """Push the files of `folder` (`upload_names`: compressm's files of an output folder; not its subfolders) to the
    Hub model repo `repo_id` in one commit.

    Returns:
        the commit URL from `huggingface_hub`.
    """
    if not os.path.isdir(folder):
        raise ValueError(f"folder {folder!r} does not exist")
    return _FolderUpload(folder).push_to_hub(repo_id, private=private, token=token, commit_message=commit_message)
