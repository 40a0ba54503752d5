"""What a user runs: the predictor, the command line (`catseg-demo`), the web page (`catseg-web`),
the files they write (outputs.py, overlay.py, output_dir.py), vocabulary parsing and the
SAM-refined mode; batch labelling (`catseg-label`: label.py, label_folder.py, input_stream.py,
image_stream.py) and video input (video.py)."""
