"""Score hand-picked smoothing candidates on Qwen2.5-Coder-0.5B with the whole-model search loss.

usage: python benchmarks/search_experiment.py N_STAT_SAMPLES 'C(alpha,"max"|"mean","all"|"norm")' ...
Prints one row per candidate (the identity always included); used for accuracy.md's stat/pairs table.
"""
import sys, json, torch, time
from transformers import AutoTokenizer
from vllm_sqplus.checkpoint import load_model
from vllm_sqplus.calib import load_calibration_texts, tokenize_samples, split_heldout
from vllm_sqplus.search import search_alpha, Candidate, IDENTITY, QuantSpec
torch.set_num_threads(2)
M = ".models/qwen2.5-coder-0.5b-instruct"
model, arch = load_model(M)
tok = AutoTokenizer.from_pretrained(M)
ids = tokenize_samples(tok, load_calibration_texts("humaneval"), 132, 512)
st, ho = split_heldout(ids, 4)
st = st[:int(sys.argv[1])]
C = Candidate
cands = [IDENTITY] + [eval(x) for x in sys.argv[2:]]
t = time.time()
r = search_alpha(model, arch, st, ho, QuantSpec(128, True, torch.bfloat16), cands, refine=False, progress=False)
for row in r.table: print(row)
print("seconds", time.time() - t)
