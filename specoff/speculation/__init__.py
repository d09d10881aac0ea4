"""Speculative decoding over an offloaded target.

chain.py and chain_scheduler.py: SpecOffload's chains over two interleaved row groups;
tree.py, growth.py, verify.py and tree_scheduler.py: SpecExec's draft trees (structure,
growth, verification and commit, the schedule); requests.py: what both schedules share.
"""
