from featx.cli import main

if __name__ == "__main__":  # decoding processes import this module again
    main()
