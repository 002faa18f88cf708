"""table.md from this folder's bench.py JSON files: `python make_table.py > table.md`."""
import json


def rows(f):
    return {(r['model'], r['policy'], str(r.get('budget')), r['ctx'], r['batch'], r.get('mode', 'prefill'),
             r.get('impl', 'ours')): r for r in json.load(open(f))['rows']}


old = {**rows('ab/old-targets-smollm2.json'), **rows('ab7/old-targets-7b.json')}
new = {**rows('ab/new-targets-smollm2.json'), **rows('verify2/new-targets-7b-short.json'),
       **rows('ab7/new-targets-7b-long.json')}
solo = rows('solo/new-targets-smollm2.json')
print("# Issue 18, session 11: every row of `bench.py --plan targets`, the landed main (783c16e, old/) beside this checkout")
print()
print("Two NVIDIA H200s of one host (nvidia-h200-x2), torch 2.11.0+cu130, bf16, random weights. `bash scripts/gpu_issue18.sh")
print("smollm2-ab` (SmolLM2: old on GPU 1 beside new on GPU 0, then new alone: the last two columns) and `7b-ab` (the 7B: old")
print("targets-7b on GPU 1 beside new targets-7b-long on GPU 0); the new 7B 1k/2k rows: `verify2` (GPU 0, after the -m gpu")
print("tests there). prefill / full: the median of each rep's ratio to the full prefill just before it (bench.py since this")
print("session; old/ takes the ratio of the two medians). `python make_table.py > table.md`.")
print()
print("| model | policy | budget | ctx | B | mode | decode tok/s old | new | new/old | % bound old | new | prefill / full old"
      " | new | new alone: decode | prefill / full |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
f = lambda r, key, fmt: (fmt % r[key]) if r and key in r else ''  # noqa: E731
for k, n in new.items():
    if k[6] != 'ours':
        continue
    o, s = old.get(k), solo.get(k)
    print(f"| {' | '.join(str(x) for x in k[:6])} | {f(o, 'decode_tok_s', '%.1f')} | {n['decode_tok_s']:.1f} | "
          f"{n['decode_tok_s'] / o['decode_tok_s']:.2f}x | {f(o, 'pct_bound', '%.0f')} | {n['pct_bound']:.0f} | "
          f"{f(o, 'prefill_vs_full', '%.2f')} | {n['prefill_vs_full']:.2f} | {f(s, 'decode_tok_s', '%.1f')} | "
          f"{f(s, 'prefill_vs_full', '%.2f')} |")
ours = new[('smollm2', 'full', '-', 1024, 1, 'prefill', 'ours')]['decode_tok_s']
for k, n in new.items():
    if k[6] != 'ours':
        print(f"| {k[0]} | full | - | 1024 | 1 | {k[6]} | | {n['decode_tok_s']:.1f} | ours {ours / n['decode_tok_s']:.2f}x"
              " | | | | | | |")
print()
print("Token by token (`scripts/tokenwise_ab.py`, SmolLM2, a2sf / h2o at 20% (410), batch 64, 2,048 tokens): this checkout's")
print("graph step 13,100.1 / 12,999.9 tok/s, compiled step 48,650.3 / 44,413.2 (verify2/tokenwise.log); the landed main's eager")
print("calls 987.5 / 1,035.3 (session 10, run9-all/tokenwise.log, the same kind of machine): 13.3x / 12.6x and 49.3x / 42.9x.")
