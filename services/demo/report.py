"""The demo's HTML report: the evaluation table, neighbour grids, loss curves and the
pipeline's own figures (events ingested, dead letters, versions, freshness)."""

from __future__ import annotations

import html
import shutil
from pathlib import Path

from sqlalchemy import text

from shared import topics
from shared.db.engine import make_engine
from shared.kafka.offsets import topic_size
from shared.settings import load_settings

_TYPES = {0: "view", 1: "appreciate", 2: "comment", 3: "own"}


def markdown_table(markdown: str) -> str:
    """The first Markdown table in `markdown` as HTML (the eval writes plain pipe tables)."""
    rows = [line.strip().strip("|").split("|") for line in markdown.splitlines()
            if line.strip().startswith("|")]
    rows = [r for r in rows if not all(set(c.strip()) <= set("-: ") for c in r)]
    if not rows:
        return f"<pre>{html.escape(markdown)}</pre>"
    head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>"
                   for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def pipeline_figures(settings) -> dict:
    engine = make_engine(settings)
    with engine.connect() as conn:
        by_type = dict(conn.execute(text(
            "SELECT type, count(*) FROM interactions GROUP BY type")).all())
        projects = dict(conn.execute(text(
            "SELECT status, count(*) FROM projects GROUP BY status")).all())
        versions = [dict(r._mapping) for r in conn.execute(text(
            "SELECT id, kind, parent_id, status, created_at, metrics FROM model_versions "
            "ORDER BY id"))]
        parked = conn.execute(text("SELECT to_regclass('embed_failures') IS NOT NULL")).scalar()
        failures = conn.execute(
            text("SELECT count(*) FROM embed_failures WHERE attempts >= :n"),
            {"n": settings.embed_max_attempts}).scalar() if parked else 0
    engine.dispose()
    dlq = {t: topic_size(settings, topics.dlq_topic(t))
           for t in topics.source_topics(settings.topic_prefix)}
    return {"interactions": {_TYPES.get(k, k): v for k, v in by_type.items()},
            "projects": projects, "versions": versions, "dead_letters": dlq,
            "embed_failures_parked": failures}


def _versions_html(versions: list[dict]) -> str:
    rows = []
    for v in versions:
        keys = ("recall@20", "val_score", "val_cosine", "parent_val_score", "map@20")
        shown = {k: round(v["metrics"][k], 4) for k in keys
                 if isinstance(v["metrics"].get(k), int | float)}
        rows.append(f"<tr><td>v{v['id']}</td><td>{v['kind']}</td><td>{v['parent_id'] or ''}"
                    f"</td><td>{v['status']}</td><td>{v['created_at']:%H:%M:%S}</td>"
                    f"<td>{html.escape(str(shown))}</td></tr>")
    return ("<table><thead><tr><th>version</th><th>kind</th><th>parent</th><th>status</th>"
            "<th>created</th><th>metrics</th></tr></thead><tbody>" + "".join(rows)
            + "</tbody></table>")


def _loss_curves(data_dir: Path, out: Path) -> list[str]:
    names = []
    for png in sorted((data_dir / "models" / "cnn").glob("v*/loss.png")):
        name = f"loss-{png.parent.name}.png"
        shutil.copy2(png, out / name)
        names.append(name)
    return names


def write_report(demo) -> Path:
    settings = load_settings(data_dir=demo.data_dir)
    out = demo.data_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    figures = pipeline_figures(settings)
    eval_md = (out / "eval.md").read_text() if (out / "eval.md").exists() else "(no eval)"
    state = demo.state()
    live = state.get("live", {})
    caught_up = state.get("caught_up", {})
    durations = {step: state[step].get("seconds") for step in ("live", "caught_up", "eval")
                 if step in state}
    curves = "".join(f'<figure><img src="{n}"><figcaption>{n}</figcaption></figure>'
                     for n in _loss_curves(demo.data_dir, out))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>cofeat demo</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}
img{{max-width:100%}}figure{{display:inline-block;width:45%}}</style></head><body>
<h1>cofeat demo ({demo.scale})</h1>
<h2>Evaluation: features from behaviour vs. category labels vs. hand-crafted</h2>
{markdown_table(eval_md)}
<h2>Nearest neighbours of held-out projects under each feature source</h2>
<img src="neighbours.png" alt="neighbour grids">
<h2>Pipeline</h2>
<ul><li>interactions stored: {html.escape(str(figures['interactions']))}</li>
<li>projects: {html.escape(str(figures['projects']))}</li>
<li>dead letters: {html.escape(str(figures['dead_letters']))}</li>
<li>embed failures parked: {figures['embed_failures_parked']}</li>
<li>freshness (event → searchable, from the embedder's histogram):
{html.escape(str(live.get('freshness')))}</li>
<li>drift between Milvus and Postgres: during the live loop
{html.escape(str(live.get('drift')))}; after the catch-up (<code>cofeat embed --verify</code>)
{html.escape(str(caught_up.get('verify')))}</li>
<li>step durations in seconds (the run that did each step): {html.escape(str(durations))}
</li></ul>
<h3>Model versions</h3>{_versions_html(figures['versions'])}
<h2>Loss curves</h2>{curves or '<p>none</p>'}
</body></html>"""
    path = out / "index.html"
    path.write_text(page)
    return path
