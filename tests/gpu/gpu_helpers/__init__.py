"""Helpers of the GPU suite (tests/gpu): where ranks run and how they are spawned
(`ranks`), the correctness ladder against the float64 oracle (`ladder`), the reliability
runs with one subprocess per rank (`reliability`) and their pure judges (`judge`).

Importable as `gpu_helpers` because pytest puts tests/gpu on sys.path (and the spawned
ranks inherit it); the CPU tests import `judge` and the fake reliability runs from here.
"""
