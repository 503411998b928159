#!/usr/bin/env bash
# the tuned configuration, from the quickstart report
# here:
sglang-ext serve --model-path smollm2-135m --speculative-algorithm EAGLE --speculative-draft-model-path /work/main/drafters/smollm2-135m-eagle --speculative-num-steps 3 --speculative-eagle-topk 1 --max-running-requests 4 --speculative-policy-config /tmp/qsfinal2/tuned-policy.json
# on a GPU server with SGLang + sglang-ext:
# sglang-ext export-drafter /work/main/drafters/smollm2-135m-eagle ./drafter-eagle3
# python -m sglang.launch_server --model-path '<HF directory of the target>' --speculative-algorithm EAGLE3 --speculative-draft-model-path ./drafter-eagle3 --speculative-num-steps 3 --speculative-eagle-topk 1 --speculative-num-draft-tokens 4 --speculative-policy-config tuned-policy.json --online-learning --enable-metrics
