from tensormerge.cli import main

main()
