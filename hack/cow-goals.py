#!/usr/bin/env python3
# hack/cow-goals.py A.txt [B.txt ...]: issue 3's write-goal ratios from the raw output of
# hack/bench-cow-ab.sh (or go test -bench of cow's Write rows run several times), as the
# median of each pass's own ratio (passes paired in order), with the passes in brackets.
import re,statistics,collections,sys
def load(f):
    d=collections.defaultdict(list); par=None
    for l in open(f):
        m=re.match(r'Benchmark(\S+?)-2\s+\d+\s+([\d.]+) ns/op',l)
        if m: d[m.group(1)].append(float(m.group(2)))
    return d
rows=[("qd1 16v1 first",  "Write/{p}/snaps=1/first","Write/{p}/snaps=16/first"),
      ("qd1 16v1 first durable","Write/{p}/snaps=1/first-durable","Write/{p}/snaps=16/first-durable"),
      ("qd16 16v1 first","WriteParallel/{p}/snaps=1/first","WriteParallel/{p}/snaps=16/first"),
      ("qd1 1v0 first durable","Write/{p}/snaps=0/first-durable","Write/{p}/snaps=1/first-durable"),
      ("qd16 1v0 first durable","WriteParallel/{p}/snaps=0/first-durable","WriteParallel/{p}/snaps=1/first-durable"),
      ("qd1 rewrite vs 0","Write/{p}/snaps=0/first","Write/{p}/snaps=1/rewrite"),
      ("qd1 rewrite durable vs 0","Write/{p}/snaps=0/first-durable","Write/{p}/snaps=1/rewrite-durable"),
      ("qd16 rewrite vs 0","WriteParallel/{p}/snaps=0/first","WriteParallel/{p}/snaps=1/rewrite")]
for f in sys.argv[1:]:
    d=load(f); print(f)
    for name,base,x in rows:
        out=[]
        for p in ("seq1M","rand4K"):
            b=d[base.format(p=p)]; y=d[x.format(p=p)]
            r=[bb/yy for bb,yy in zip(b,y)]
            out.append("%.2f (%s)"%(statistics.median(r),", ".join("%.2f"%v for v in r)))
        print("  %-28s seq %s | rand %s"%(name,out[0],out[1]))
