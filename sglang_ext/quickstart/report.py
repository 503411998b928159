"""``report.md`` and ``report.html`` (plots inlined) from the steps' records: every number in them is read from the
run directory's step files, so the report cannot disagree with what the run wrote."""

from __future__ import annotations

import base64
import html
import json
import re
import shlex
from pathlib import Path
from typing import Any

from .rundir import write_atomic
from .settings import STEPS

PLOTS = (("acceptance.png", "Acceptance length over the shifting stream, static vs online drafter"),
         ("latency_vs_load.png", "Simulated p90 latency and throughput vs load, per policy"),
         ("tuning.png", "The tuner's search in the simulator"))


def _f(x: Any, fmt: str = ".2f") -> str:
    return "–" if x is None else f"{x:{fmt}}"


def _seg_sizes(summary: dict) -> list[str]:
    return [f"{b['stop'] - b['start']} {name}" for name, b in summary["segments"].items()]


def deploy_commands(ctx) -> dict[str, str]:
    """The flags the run tuned, for this machine's server and for SGLang with the plugin."""
    s = ctx.settings
    prov = ctx.rundir.result("provision")
    tuned = (ctx.out / "tuned-policy.json").resolve()
    drafter = prov["drafter"]["path"]
    here = shlex.join(["sglang-ext", "serve", "--model-path", s.model, "--speculative-algorithm", "EAGLE",
                       "--speculative-draft-model-path", drafter, "--speculative-num-steps", str(s.num_steps),
                       "--speculative-eagle-topk", "1", "--max-running-requests", str(s.batch),
                       "--speculative-policy-config", str(tuned)])
    export = shlex.join(["sglang-ext", "export-drafter", drafter, "./drafter-eagle3"])
    gpu = shlex.join(["python", "-m", "sglang.launch_server", "--model-path", "<HF directory of the target>",
                      "--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", "./drafter-eagle3",
                      "--speculative-num-steps", str(s.num_steps), "--speculative-eagle-topk", "1",
                      "--speculative-num-draft-tokens", str(s.num_steps + 1),
                      "--speculative-policy-config", "tuned-policy.json", "--online-learning", "--enable-metrics"])
    return {"here": here, "export": export, "sglang": gpu}


def report_markdown(ctx, cmds: dict[str, str]) -> str:
    from .steps import machine

    s, rd = ctx.settings, ctx.rundir
    prov, prof, srv = rd.result("provision"), rd.result("profile"), rd.result("serve")
    sim, chk = rd.result("simulate"), rd.result("check")
    m = machine()
    L = ["# sglang-ext quickstart report", "",
         f"Model **{prov['model']}**, drafter {prov['drafter']['source']}, on {m['hardware']} "
         f"({m['cpu_count']} CPUs; {s.threads} serving thread(s), online training in its own process). "
         f"Seed {s.seed}.", ""]
    L += ["## 1. Profile of this machine", "",
          f"{prof['summary']}. " + ("Reused from the cache (same hardware, versions, model and grid)."
                                    if prof["reused_cache"] else f"Measured in {prof['profile_seconds']:.0f} s."),
          "The profile is `profile.json`; the simulator below prices every step with its fitted cost model.", ""]
    summ = srv["summary"]
    segs = list(summ["segments"])
    L += ["## 2. Serving a stream that shifts chat → code → maths", "",
          f"{len(srv['stream'])} requests ({', '.join(_seg_sizes(summ))}), "
          f"greedy, {s.max_new_tokens} new tokens, batch {s.batch}, EAGLE chain k = {s.num_steps}; the two "
          "configurations are stepped alternately in one process so machine noise falls on both.", "",
          "| configuration | " + " | ".join(f"{c}: accept len / tok/s" for c in segs) + " | all: tok/s | training rounds deployed / refused | identical to static |",
          "|---|" + "---:|" * len(segs) + "---:|---:|---:|"]
    for name, c in summ["configs"].items():
        on = c.get("online")
        rounds = f"{on['deployed']} / {on['rejected']} (of {on['rounds_submitted']} started)" if on else "–"
        cells = [f"{_f(c['segments'][g]['accept_length'])} / {_f(c['segments'][g]['tokens_per_s'], '.1f')}" for g in segs]
        L.append(f"| {name} | " + " | ".join(cells) + f" | {_f(c['tokens_per_s'], '.1f')} | {rounds} | "
                 f"{c['identical_to_static']}/{c['requests']} |")
    L += ["", "![acceptance](acceptance.png)", ""]
    acc = srv["acceptance"]
    if acc.get("categories"):
        L += ["Acceptance fitted on the static run (per-draft acceptance rate α, per-position decay δ "
              f"{_f(acc.get('decay'), '.3f')}), which the simulator replays: "
              + ", ".join(f"{c} α {_f(d['alpha'], '.3f')}" for c, d in acc["categories"].items()) + ".", ""]
    L += ["## 3. Simulating a trace with these costs", "",
          f"Trace `{Path(sim['trace']['file']).name}` ({sim['trace']['requests']} requests, prompts ≤ "
          f"{sim['trace']['max_prompt_tokens']}, outputs ≤ {sim['trace']['max_output_tokens']} tokens), arrivals "
          f"scaled to each offered load (× plain decoding's capacity, {_f(sim['capacity_req_s'], '.2f')} req/s at batch "
          f"{s.batch}). SLO: p90 TPOT ≤ {1e3 * sim['slo_tpot_s']:.0f} ms ({sim['slo_source']} at load {s.tune_load}).", "",
          "| policy | " + " | ".join(f"load {ld}: tok/s / p90 TPOT ms / p90 E2E s" for ld in s.loads) + " |",
          "|---|" + "---:|" * len(s.loads)]
    for name in dict.fromkeys(r["policy"] for r in sim["rows"]):
        cells = []
        for ld in s.loads:
            r = next(r for r in sim["rows"] if r["policy"] == name and r["load"] == ld)
            cells.append(f"{_f(r['throughput_tok_s'], '.1f')} / {1e3 * r['tpot_p90_s']:.0f} / {_f(r['e2e_p90_s'], '.1f')}")
        L.append(f"| {name} | " + " | ".join(cells) + " |")
    t = sim["tune"]
    L += ["", "![latency vs load](latency_vs_load.png)", "",
          f"Best adaptive policy at load {s.tune_load}: **{t['policy']}**. Tuned ({t['evaluations']} simulations, "
          f"objective: tokens/s under the SLO): `{json.dumps(t['params'])}`; simulated {_f(t['score'], '.1f')} vs "
          f"defaults {_f(t['default_score'], '.1f')}. Written to `tuned-policy.json`.", "",
          "![tuning](tuning.png)", ""]
    v = chk["verdict"]
    L += ["## 4. Checking the tuned policy on the real engine", "",
          f"{chk['requests']} held-out requests (the trace's last ones, real prompt text, all queued at once), "
          f"{chk['rounds']} interleaved round(s), median tokens/s; greedy outputs compared with speculation off on "
          "the same runs.", "",
          "| arm | tok/s (median) | runs | accept length | identical to off |", "|---|---:|---|---:|---:|"]
    for a in chk["arms"]:
        L.append(f"| {a['arm']} | {_f(a['median_tok_s'], '.2f')} | {', '.join(f'{x:.1f}' for x in a['throughputs'])} | "
                 f"{_f(a['accept_length'])} | {'yes' if a['identical'] else 'NO'} |")
    L += ["", f"Tuned is **{v['tuned_vs_defaults']:.3f}×** the defaults and {v['tuned_vs_off']:.3f}× speculation off"
          f" ({'beats' if v['beats_defaults'] else 'does not beat'} the defaults on this run; read differences under "
          "~5 % as machine noise).", ""]
    L += ["## 5. Deploy it", "", "On this machine (the reference engine, OpenAI-compatible):", "", "```bash",
          cmds["here"], "```", "", "On a GPU server with SGLang 0.5.23 and this plugin installed:", "", "```bash",
          cmds["export"], cmds["sglang"], "```", ""]
    L += ["## Run", "", "| step | seconds |", "|---|---:|"]
    times = {k: v for k, v in rd.timings().items() if k in STEPS}
    L += [f"| {k} | {v:.1f} |" for k, v in times.items()] + [f"| all steps before the report | {sum(times.values()):.1f} |"]
    L += ["", f"Machine: {m['platform']}; Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
          f"sglang-ext {m['sglang_ext']}. Settings: `settings` in `state.json`.", ""]
    return "\n".join(L)


def markdown_to_html(md: str, base: Path) -> str:
    """The report's own markdown subset (headings, tables, fenced code, images, paragraphs) as one HTML page with
    the PNGs inlined, so it can be mailed or attached as one file."""

    def inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", text)

    out, lines, i = [], md.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append("<pre><code>" + html.escape("\n".join(lines[i + 1:j])) + "</code></pre>")
            i = j + 1
            continue
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("!["):
            mt = re.match(r"!\[(.*?)\]\((.*?)\)", line)
            if mt and (base / mt.group(2)).is_file():
                data = base64.b64encode((base / mt.group(2)).read_bytes()).decode()
                out.append(f'<p><img alt="{html.escape(mt.group(1))}" src="data:image/png;base64,{data}" '
                           'style="max-width:100%"></p>')
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            head, body = rows[0], [r for r in rows[2:]]
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</table>")
            continue
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
        i += 1
    style = ("body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}pre{background:#f4f4f4;padding:1em;overflow-x:auto}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>sglang-ext quickstart report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


def write_report(ctx) -> list[str]:
    cmds = deploy_commands(ctx)
    md = report_markdown(ctx, cmds)
    write_atomic(ctx.out / "report.md", md)
    write_atomic(ctx.out / "report.html", markdown_to_html(md, ctx.out))
    write_atomic(ctx.out / "deploy.sh", "#!/usr/bin/env bash\n# the tuned configuration, from the quickstart report\n"
                 f"# here:\n{cmds['here']}\n# on a GPU server with SGLang + sglang-ext:\n# {cmds['export']}\n"
                 f"# {cmds['sglang']}\n")
    return ["report.md", "report.html", "deploy.sh", "tuned-policy.json", "profile.json",
            *[p for p, _ in PLOTS if (ctx.out / p).is_file()]]
