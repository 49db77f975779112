#!/bin/bash
# Session 21, after cache.WORDS3 became the GPU default: launch variants for 3-bit pairs with token-blocked
# values (G = 128), whole decode steps per plan in both 3-bit layouts, then the GPU test suite (pytest-xdist
# from wheels/, carried: the device has no PyPI). Output under $OUT (or benchmarks/results/words3_check).
# wheels/ is not committed: first `pip download --no-deps -d wheels pytest-xdist execnet` here, then carry it.
set -u
export PYTHONPATH=$PWD/src
O=${OUT:-benchmarks/results/words3_check}; mkdir -p $O
A=benchmarks/ab_decode_variants.py
run() { local t=$1 f=$2; shift 2; echo "## $*" >> $O/$f.txt; timeout $t python $A "$@" 2>&1 | grep --line-buffered -v Warning | tee -a $O/$f.txt; }
TK='"token_block": 128, "key_words": true'
run 80 g128_launch --pairs 32,33,34 --shapes 64x4096 --variants "[{$TK}, {$TK, \"maxnreg\": 168}, {$TK, \"num_stages\": 2}, {$TK, \"splits_per_sm\": 4}]"
run 40 g128_launch --pairs 43 --shapes 64x4096 --variants "[{$TK}, {$TK, \"num_stages\": 2}]"
run 40 g128_launch --pairs 23 --shapes 64x4096 --variants '[{"token_block": 128}, {"token_block": 128, "num_stages": 2}]'
timeout 170 python benchmarks/ab_decode_step.py --layers 30 --batch 64 --context 4096 --repeats 3 \
    --plan-file searched3.25=benchmarks/results/smollm2-rot3-sink1-kl512.plan-3.25.json \
    --out $O/decode_step_words3.md 2>&1 | grep -v Warning > $O/decode_step.log
pip install -q --no-deps --target /tmp/xd wheels/pytest_xdist-*.whl wheels/execnet-*.whl > $O/pip.log 2>&1
PYTHONPATH=/tmp/xd:$PWD/src timeout ${TEST_S:-250} python -m pytest -q -x -n 12 tests/test_kernels.py \
    tests/test_generation.py tests/test_ptx_unpack.py tests/test_launch.py > $O/gpu_tests.log 2>&1
echo "pytest rc $?" >> $O/gpu_tests.log
