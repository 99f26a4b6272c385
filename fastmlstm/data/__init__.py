"""Data: the evaluation sets in their distributed formats, training corpora as memory-mapped byte
streams, and the checked downloader.

- :mod:`.datasets`: ``load(name)`` for SST-2, IMDB, MR, CR, SUBJ, MPQA, MSRP, SICK, Yelp, Blitzer's
  multi-domain reviews.
- :mod:`.corpus`: byte streams and row layouts for training.
- :mod:`.fetch`: one checked HTTP transfer (Range resume, checksums, atomic rename).
- :mod:`.download`: ``download(name)`` for the evaluation sets (and, re-exported, the pretrained
  models' ``download_model``).
"""
