"""Data sets: Flickr8k-style image folders and the original bottom-up feature layout."""
