"""Latent cards: one static HTML page per SAE showing, for a sample of its latents, the held-out
contexts where each fires most, with the firing token highlighted. No scripts, no external files."""
from __future__ import annotations

import html
import os

WINDOW_BEFORE, WINDOW_AFTER = 16, 4

STYLE = """body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;color:#222}
h2{font-size:1.1em;margin-top:2em;border-top:1px solid #ccc;padding-top:.5em}
table{border-collapse:collapse}td{padding:.15em .6em;vertical-align:top}
.ctx{font-family:ui-monospace,monospace;white-space:pre-wrap}.hit{background:#f6a23a;font-weight:bold}
.act{text-align:right;color:#555}.meta{color:#666}
.bar{display:inline-block;height:.7em;background:#4a7fb5}"""


def token_text(decode, token_id: int) -> str:
    """One token as text (the id when no tokenizer decodes it)."""
    if decode is None:
        return f"[{token_id}]"
    try:
        return decode([int(token_id)])
    except Exception:  # noqa: BLE001 - any tokenizer failure: show the id
        return f"[{token_id}]"


def context_html(tokens, pos: int, decode) -> str:
    """Tokens around ``pos`` of one context (1-D ids) as HTML, the token at ``pos`` highlighted."""
    lo, hi = max(0, pos - WINDOW_BEFORE), min(len(tokens), pos + WINDOW_AFTER + 1)
    parts = []
    for p in range(lo, hi):
        text = html.escape(token_text(decode, tokens[p])).replace("\n", "\u21b5")
        parts.append(f'<span class="hit">{text}</span>' if p == pos else text)
    return ("\u2026" if lo > 0 else "") + "".join(parts) + ("\u2026" if hi < len(tokens) else "")


def write_card(path: str, title: str, summary: dict, latents: list[dict], decode=None) -> None:
    """Write one SAE's card.

    ``latents``: [{"latent": i, "density": float, "examples": [{"act": float, "tokens": ids [L],
    "pos": p, "context": c}, ...]}, ...], examples sorted by activation, strongest first. A CLT
    latent also has "writes": [(output site, its decoder block's norm), ...], shown as bars.
    """
    out = [f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><style>{STYLE}</style>",
           f"<h1>{html.escape(title)}</h1><p class=meta>"
           + " &middot; ".join(f"{html.escape(str(k))}: {html.escape(_fmt(v))}" for k, v in summary.items()) + "</p>"]
    for lat in latents:
        ex = lat["examples"]
        peak = ex[0]["act"] if ex else 0.0
        out.append(f"<h2>latent {lat['latent']}</h2><p class=meta>fires on {100 * lat['density']:.3g}% of "
                   f"held-out tokens; max activation {peak:.4g}</p>")
        if lat.get("writes"):
            top = max(v for _, v in lat["writes"]) or 1.0
            out.append("<table class=meta><tr><td colspan=3>decoder norm to each layer it writes to</td></tr>"
                       + "".join(f'<tr><td>{html.escape(site)}</td><td class=act>{v:.3g}</td><td><span class=bar '
                                 f'style="width:{12 * v / top:.2f}em"></span></td></tr>' for site, v in lat["writes"])
                       + "</table>")
        out.append("<table>")
        for e in ex:
            out.append(f"<tr><td class=act>{e['act']:.4g}</td><td class=ctx>{context_html(e['tokens'], e['pos'], decode)}"
                       f"</td><td class=meta>ctx {e['context']} pos {e['pos']}</td></tr>")
        out.append("</table>" if ex else "</table><p>(never fired on the held-out contexts)</p>")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("\n".join(out) + "\n")
    os.replace(tmp, path)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
