import Shared

SliceCommand.main()
