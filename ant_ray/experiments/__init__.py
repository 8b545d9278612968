"""Experiments built on the stages and the search: the fixed DeMe pipeline (`ant-ray run`), the ANT and DeMe
comparisons, and ANT's negative transfer gap."""
