"""Running the model: request/result types, sampling, the layout step, the thinker and talker engines,
the vocoder, the pipeline that ties them together and the streaming scheduler."""
