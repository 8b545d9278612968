"""Stages: each runs one Ray Train job or one scoring task and returns where its result is (a model folder, task
vectors, a metric). Usable alone (`ant-ray train-ant`, `ant-ray run`) and as the body of a search trial."""
