"""Producers: dataset rows -> prompt groups -> rq jobs, under the admission gate."""
