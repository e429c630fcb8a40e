"""An offline stand-in for the Hugging Face Hub that transformers' `push_to_hub` talks to (shared by tests)."""

from pathlib import Path


class FakeHub:
    """Stands in for transformers' HfApi: records create_repo and the files of create_commit (read at commit time,
    while push_to_hub's temporary folder still exists)."""

    def __init__(self):
        self.repos, self.commits = [], []

    def create_repo(self, repo_id, private=None, **kwargs):
        self.repos.append((repo_id, private))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for operation in operations:
            source = operation.path_or_fileobj
            files[operation.path_in_repo] = Path(source).read_bytes() if isinstance(source, (str, Path)) else source
        self.commits.append({"repo_id": repo_id, "files": files, **kwargs})
        return f"https://huggingface.co/{repo_id}/commit/0"


def install_fake_hub(monkeypatch) -> FakeHub:
    """Route transformers' uploads to a FakeHub (repos without a card on the Hub), online mode, a dummy token."""
    import huggingface_hub
    import transformers.modeling_utils
    import transformers.utils.hub
    from huggingface_hub.errors import EntryNotFoundError

    hub = FakeHub()
    if hasattr(transformers.utils.hub, "hf_api"):  # transformers >= 5.10 uploads through one HfApi instance
        monkeypatch.setattr(transformers.utils.hub, "hf_api", lambda: hub)
        monkeypatch.setattr(transformers.modeling_utils, "hf_api", lambda: hub)
    else:  # earlier releases call huggingface_hub's create_repo / create_commit functions
        monkeypatch.setattr(transformers.utils.hub, "create_repo", hub.create_repo)
        monkeypatch.setattr(transformers.utils.hub, "create_commit", hub.create_commit)

    def no_card_on_hub(cls, repo_id, *args, **kwargs):  # a new repo: transformers writes its placeholder card
        raise EntryNotFoundError(f"{repo_id} has no README.md")

    monkeypatch.setattr(huggingface_hub.ModelCard, "load", classmethod(no_card_on_hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    return hub
