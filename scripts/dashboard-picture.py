"""Draws the main panels of docs/grafana-dashboard.json from scrapes of the
balancer's /metrics (samples.txt: "=== UNIXTIME" lines, each followed by
one scrape) as one HTML page, for scripts/dashboard-picture.sh.

  python3 scripts/dashboard-picture.py samples.txt page.html
"""
import re, sys, html
from collections import defaultdict

LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

samples = []
cur = None
for line in open(sys.argv[1]):
    line = line.rstrip('\n')
    if line.startswith('=== '):
        cur = (float(line[4:]), {})
        samples.append(cur)
        continue
    if not line or line.startswith('#') or cur is None:
        continue
    m = LINE.match(line)
    if not m:
        continue
    name, labels, value = m.group(1), m.group(2) or '', float(m.group(3))
    cur[1][(name, tuple(LABEL.findall(labels)))] = value
samples = [s for s in samples if s[1]]
t0 = samples[0][0]

def series(name, by, where=lambda l: True):
    out = defaultdict(lambda: [0.0] * len(samples))
    for i, (_, vals) in enumerate(samples):
        for (n, labels), v in vals.items():
            if n != name:
                continue
            l = dict(labels)
            if not where(l):
                continue
            out[by(l)][i] += v
    return out

def rate(values, window=3):
    r = []
    for i in range(len(values)):
        j = max(0, i - window)
        dt = samples[i][0] - samples[j][0]
        r.append(max(0.0, (values[i] - values[j]) / dt) if dt > 0 else 0.0)
    return r

def rates(d):
    return {k: rate(v) for k, v in d.items()}

def quantile(q, window=5):
    buckets = series('lbft_request_duration_seconds_bucket', lambda l: l['le'])
    les = sorted((k for k in buckets if k != '+Inf'), key=float) + ['+Inf']
    out = []
    for i in range(len(samples)):
        j = max(0, i - window)
        counts = [buckets[le][i] - buckets[le][j] for le in les]
        total = counts[-1]
        if total <= 0:
            out.append(None)
            continue
        want = q * total
        prev_c, prev_b = 0.0, 0.0
        val = None
        for le, c in zip(les, counts):
            b = float(le) if le != '+Inf' else prev_b
            if c >= want:
                val = prev_b + (b - prev_b) * ((want - prev_c) / (c - prev_c) if c > prev_c else 0)
                break
            prev_c, prev_b = c, b
        out.append(val)
    return out

COLORS = ['#73bf69', '#f2cc0c', '#5794f2', '#ff9830', '#f2495c', '#b877d9', '#8ab8ff', '#ffcb7d', '#96d98d']

def fmt(v, unit):
    if v is None:
        return '-'
    if unit == 'B/s':
        for u in ['B/s', 'KiB/s', 'MiB/s', 'GiB/s']:
            if abs(v) < 1024 or u == 'GiB/s':
                return f'{v:.1f} {u}' if u != 'B/s' else f'{v:.0f} B/s'
            v /= 1024
    if unit == 's':
        return f'{v*1000:.1f} ms' if v < 1 else f'{v:.2f} s'
    if unit == '/s':
        return f'{v:.1f}/s' if v < 100 else f'{v:.0f}/s'
    return f'{v:g}'

def chart(title, lines, unit, w=660, h=250):
    pad_l, pad_r, pad_t, pad_b = 70, 10, 10, 24
    allv = [v for _, vals in lines for v in vals if v is not None]
    vmax = max(allv + [0]) or 1
    vmax *= 1.1
    tmax = samples[-1][0] - t0
    X = lambda t: pad_l + (w - pad_l - pad_r) * t / tmax
    Y = lambda v: pad_t + (h - pad_t - pad_b) * (1 - v / vmax)
    out = [f'<svg width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg">']
    for k in range(5):
        v = vmax * k / 4
        y = Y(v)
        out.append(f'<line x1="{pad_l}" x2="{w-pad_r}" y1="{y:.1f}" y2="{y:.1f}" stroke="#2c3235"/>')
        out.append(f'<text x="{pad_l-6}" y="{y+4:.1f}" text-anchor="end" class="ax">{html.escape(fmt(v, unit))}</text>')
    for s in range(0, int(tmax) + 1, 10):
        x = X(s)
        out.append(f'<text x="{x:.1f}" y="{h-6}" text-anchor="middle" class="ax">{s}s</text>')
    for idx, (name, vals) in enumerate(lines):
        color = COLORS[idx % len(COLORS)]
        pts = ' '.join(f'{X(samples[i][0]-t0):.1f},{Y(v):.1f}' for i, v in enumerate(vals) if v is not None)
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{pts}"/>')
    out.append('</svg>')
    legend = ''.join(f'<span class="lg"><i style="background:{COLORS[i % len(COLORS)]}"></i>{html.escape(n)}</span>' for i, (n, _) in enumerate(lines))
    return f'<div class="panel"><div class="title">{html.escape(title)}</div>{"".join(out)}<div class="legend">{legend}</div></div>'

def stat(title, value):
    return f'<div class="stat"><div class="title">{html.escape(title)}</div><div class="big">{html.escape(value)}</div></div>'

def last(name, where=lambda l: True):
    d = series(name, lambda l: 0, where)
    return d[0][-1] if d else 0

def peak(name):
    d = series(name, lambda l: 0)
    return max(d[0]) if d else 0

docs = rates(series('lbft_server_requests_total', lambda l: l['server'], lambda l: l['kind'] == 'document'))
byts = rates(series('lbft_server_bytes_total', lambda l: f"{l['server']} {l['kind']}", lambda l: l['kind'] != 'document'))
fails = rates(series('lbft_server_failures_total', lambda l: f"{l['server']} {l['kind']}"))
fails = {k: v for k, v in fails.items() if max(v) > 0} or {'none': [0.0] * len(samples)}
recv = rate(series('lbft_requests_received_total', lambda l: 0)[0])
failed = rate(series('lbft_requests_failed_total', lambda l: 0)[0])
unknown = rate(series('lbft_requests_unknown_total', lambda l: 0)[0])
ended = rates(series('lbft_file_transfers_total', lambda l: f"{l['kind']} {l['result']}"))
ended = {k: v for k, v in ended.items() if max(v) > 0}
up = series('lbft_server_up', lambda l: l['server'])
active = series('lbft_server_transfers_active', lambda l: l['kind'])

page = ['''<!DOCTYPE html><html><head><meta charset="utf-8"><style>
body{background:#111217;color:#ccccdc;font-family:Helvetica,Arial,sans-serif;margin:12px;width:1356px}
h1{font-size:18px;font-weight:500;margin:4px 4px 10px}
.note{font-size:12px;color:#8e8e9e;margin:0 4px 10px}
.row{display:flex;gap:8px;margin-bottom:8px}
.panel,.stat{background:#181b1f;border:1px solid #2c3235;border-radius:3px;padding:6px 8px}
.stat{flex:1;height:74px}.big{font-size:30px;color:#73bf69;margin-top:6px}
.title{font-size:13px;font-weight:500;margin-bottom:4px}
.ax{fill:#8e8e9e;font-size:10px}
.legend{font-size:11px;margin-top:2px}.lg{margin-right:12px;white-space:nowrap}
.lg i{display:inline-block;width:12px;height:3px;margin-right:4px;vertical-align:middle}
</style></head><body>
<h1>lbft balancer</h1>
<div class="note">Drawn from 75 scrapes of the balancer's /metrics (one a second) in the layout of docs/grafana-dashboard.json; not a Grafana screenshot.
Three servers, documents, computations and 40 MB uploads and downloads; server 127.0.0.1:62012 killed with kill -9 during an upload at 30 s, restarted 12 s later.</div>
<div class="row">''']
page.append(stat('Servers up (now)', f"{last('lbft_server_up'):g}"))
page.append(stat('Queue depth (peak)', f"{peak('lbft_queue_depth'):g}"))
page.append(stat('Client connections (peak)', f"{peak('lbft_client_connections'):g}"))
page.append(stat('Registration connections', f"{last('lbft_registration_connections'):g}"))
page.append(stat('File transfers (total)', f"{sum(series('lbft_file_transfers_total', lambda l: 0)[0][-1:]):g}"))
page.append(stat('Documents received', f"{last('lbft_requests_received_total'):g}"))
page.append('</div><div class="row">')
page.append(chart('Documents stored per second, by server', sorted(docs.items()), '/s'))
page.append(chart('File bytes carried per second, by server and kind', sorted(byts.items()), 'B/s'))
page.append('</div><div class="row">')
page.append(chart('Failures per second, by server and kind', sorted(fails.items()), '/s'))
page.append(chart('Requests received, failed and unknown', [('received', recv), ('failed', failed), ('unknown', unknown)], '/s'))
page.append('</div><div class="row">')
page.append(chart('Request latency', [('p50', quantile(0.5)), ('p99', quantile(0.99))], 's'))
page.append(chart('Servers up, file transfers under way', sorted((f'{k} up', v) for k, v in up.items()) + sorted((f'{k}s under way', v) for k, v in active.items()), ''))
page.append('</div></body></html>')
open(sys.argv[2], 'w').write('\n'.join(page))
