from tensormerge.cli import main

if __name__ == "__main__":  # dask and multiprocessing workers import this module again
    main()
