"""Task distributions (INR fitting, classifiers, RL policies) and the data they read."""
