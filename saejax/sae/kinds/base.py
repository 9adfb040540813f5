"""``Kind``: what one SAE kind decides. The rest of saejax asks the kind instead of testing its name.

Arguments the methods share: ``spec`` a GroupSpec (saejax.sae.group), ``params`` a group's
parameters (leading [T, K] axes), ``x`` [T, B, d] normalized rows, ``y`` [T, B, d_out] the
normalized target rows (the same array as x for an SAE; the output site's for a transcoder), ``pre`` [T, K, B, M]
pre-activations (saejax.sae.forward), ``hp`` the group's optim.Hyper, ``state`` the train state
(saejax.train.step), ``lam`` [T, K] each SAE's sweep value times the sparsity warmup.
"""
from __future__ import annotations

import jax.numpy as jnp

from saejax.sae import forward


def terms(mse, fvu, l0, fired, **extra) -> dict:
    """The per-SAE loss terms and diagnostics ``Kind.loss`` returns: mse, fvu, l0 [T, K], fired
    [T, K, M] (latents that fired on the batch), and ``extra`` in place of the defaults
    recon = mse (the reconstruction loss term: Matryoshka's sum over prefixes), sparsity = aux = 0 and
    min_active = inf [T, K] (the loss terms besides the reconstruction, and BatchTopK's smallest kept
    activation)."""
    return {"mse": mse, "fvu": fvu, "l0": l0, "fired": fired, "recon": mse, "sparsity": jnp.zeros_like(mse),
            "aux": jnp.zeros_like(mse), "min_active": jnp.full_like(mse, jnp.inf), **extra}


def recon_terms(y, f, x_hat, **extra) -> dict:
    """``terms`` from a group's forward pass: y [T, B, d] the target, f [T, K, B, M], x_hat [T, K, B, d]."""
    return terms(*forward.recon_metrics(y, f, x_hat), jnp.any(f > 0, axis=2), **extra)


class Kind:
    """One SAE kind. A subclass sets the names below and ``activate``, and overrides what differs
    from the defaults: trained on its reconstruction error alone through the group's forward pass,
    with its inference formula as training activation, unit-norm decoder rows, no parameters besides
    W_enc, b_enc, W_dec, b_dec, no threshold array and no k."""

    name: str  # registry key: config sae.arch, GroupSpec.arch, group.json "arch", the group name's prefix
    sweep_name: str  # what a member's sweep value (GroupSpec.sweep, config sae.sparsity) is: "lambda", "k", ...
    release_name: str  # the kind its released SAEs are (Gemma Scope layout, suite.json "arch")
    saelens_name: str | None = None  # SAELens's "architecture" for its released SAEs (None: none fits)
    unit_decoder = True  # decoder rows kept unit-norm (gradient along a row removed, renormalized)
    uses_threshold = False  # the inference formula compares pre with a threshold array (exported)
    infers_with_k = False  # the inference formula keeps each row's k largest (k exported)
    matryoshka = False  # trains with Matryoshka prefixes (GroupSpec.matryoshka, saejax.sae.matryoshka)

    def check_config(self, sae, check) -> None:
        """Kind-specific checks of the config's ``sae`` node; ``check(ok, key, message)`` raises."""
        check(not sae.target_l0, "sae.target_l0",
              f"{self.name} does not train to target L0s; sweep sae.sparsity (its {self.sweep_name}) instead")

    def extra_params(self, spec) -> dict[str, float]:
        """Per-latent parameters [T, K, M] besides W_enc, b_enc, W_dec, b_dec: name -> initial value."""
        return {}

    def ks(self, sweep) -> tuple[int, ...]:
        """Each member's k when the sweep values are k (latents kept per row), else ()."""
        return ()

    def activate(self, pre, threshold, ks):
        """The inference formula, used by the group at inference, by evaluation and by released
        SAEs: pre [T, K, N, M] -> f. ``threshold`` [T, K, M] (when ``uses_threshold``), ``ks`` each
        member's k (when ``infers_with_k``)."""
        raise NotImplementedError

    def inference_threshold(self, params, bt_threshold):
        """The threshold array [T, K, M] inference compares with (exported with the group), or None.
        ``bt_threshold`` [T, K] is the train state's running BatchTopK threshold."""
        return None

    def train_activation(self, spec, params, pre):
        """Latents in training, with the gradients training needs."""
        return self.activate(pre, None, self.ks(spec.sweep))

    def train_forward(self, spec, params, x):
        """(pre, f, x_hat) of the group's forward pass with the training activation."""
        return forward.reconstruct(spec, params, x, lambda pre: self.train_activation(spec, params, pre))

    def loss(self, spec, hp, params, state, x, y, lam) -> dict:
        """Per-SAE loss terms and diagnostics (``terms``) of reconstructing y from x; the loss of SAE
        (t, k) is mse + sparsity + aux."""
        _, f, x_hat = self.train_forward(spec, params, x)
        return recon_terms(y, f, x_hat)

    def constrain(self, spec, params):
        """Parameters after an optimizer update, put back in their domain."""
        return params

    def revive(self, spec, hp, params, state, x):
        """Parameters after an update, with a dead-latent remedy applied (``state``: the SAEs' train
        state slices, ``since_fired`` counting steps without firing before this one; x [T, B, d]:
        this step's rows)."""
        return params

    def calibrates(self, spec) -> bool:
        """Whether ``calibrate`` sets parameters from the first batch (at step 0)."""
        return False

    def calibrate(self, spec, params, x):
        """Parameters set from the batch x, at step 0 (when ``calibrates``)."""
        return params
