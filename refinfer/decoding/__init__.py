"""Decoding strategies on top of Model.forward: plain now; speculative, lookahead and
batching later. Strategies never touch kernels; kernels never know about strategies."""
