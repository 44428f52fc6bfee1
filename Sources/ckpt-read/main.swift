import Shared

ReadCommand.main()
