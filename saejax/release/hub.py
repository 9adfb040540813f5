"""The Hugging Face Hub: the subject model's Hub id, and uploading a release (``release.push_to_hub``).

``base_model(config, model)``: the Hub id of the model a release's SAEs read, for the model card's
``base_model`` and SAELens's ``model_name`` (TransformerLens loads a model by its Hub id):
``release.base_model`` when set, else ``smollm2`` -> HuggingFaceTB/SmolLM2-135M-Instruct (the
default's GGUF is that checkpoint quantized to Q4_1; the card says so), ``hf:<owner>/<name>`` -> that
id; other sources (a local checkpoint, a GGUF file, a random model) have none.

``push(folder, repo)``: create the model repo (``HfApi.create_repo``, exist_ok) and upload the
release folder with ``HfApi.upload_large_folder`` (huggingface_hub 1.x), or ``upload_folder`` where
that is the resumable multi-commit upload (huggingface_hub >= 2 with hf_xet); either way an
interrupted upload resumes when rerun. The token: ``HF_TOKEN`` or ``hf auth login``.
"""
from __future__ import annotations

import os

from saejax.release.errors import ReleaseError

KNOWN_MODELS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "smollm2-135m-instruct-q4_1": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def base_model(config, model: str = "") -> str | None:
    """The Hub id of the release's subject model (see the module doc), or None."""
    if config.release.base_model:
        return config.release.base_model
    source = str(config.model.source)
    for name in (source, model):
        if name in KNOWN_MODELS:
            return KNOWN_MODELS[name]
    kind, _, rest = source.partition(":")
    if kind == "hf" and rest.count("/") == 1 and not os.path.exists(rest) and not rest.startswith("."):
        return rest
    return None


def push(folder: str, repo: str, *, private: bool = False, token=None) -> str:
    """Upload the release ``folder`` to the Hub model repo ``repo``; return the repo's URL."""
    from huggingface_hub import HfApi
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        upload = getattr(api, "upload_large_folder", None)
        if upload is not None:
            upload(repo_id=repo, folder_path=folder, repo_type="model")
        else:
            api.upload_folder(repo_id=repo, folder_path=folder, repo_type="model",
                              commit_message="saejax release")
    except Exception as e:  # noqa: BLE001 - network, auth, quota: one line naming the repo
        raise ReleaseError(f"release.push_to_hub={repo!r}: upload failed ({type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); rerun to resume"[:400]) from None
    return str(url)
