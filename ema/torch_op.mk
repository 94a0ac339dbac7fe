# Shared build rules of the optional C++ operators in ema/ and remap/ (included by their Makefiles, which set NAME,
# SOURCES and CUDA_SOURCES). Every failure ends in one message saying what is missing and that the PyTorch fallback
# stays in use; the library is written under a temporary name and renamed, so a failed build never leaves one behind.
PYTHON ?= python3
CXXFLAGS ?= -O3
CUDA_ARCHS ?= 75 80 90
WITH_CUDA ?= auto

TORCH_INFO := $(shell $(PYTHON) -c "import torch; from torch.utils import cpp_extension as c; \
  print(torch.__version__, torch.version.cuda or 'none', int(torch._C._GLIBCXX_USE_CXX11_ABI), *c.library_paths(), \
  *c.include_paths())" 2>/dev/null)
TORCH_VERSION := $(word 1,$(TORCH_INFO))
TORCH_CUDA := $(word 2,$(TORCH_INFO))
TORCH_FLAGS := -D_GLIBCXX_USE_CXX11_ABI=$(word 3,$(TORCH_INFO)) $(addprefix -I,$(wordlist 5,99,$(TORCH_INFO)))
TORCH_LIB := $(word 4,$(TORCH_INFO))

NVCC := $(or $(wildcard $(CUDA_HOME)/bin/nvcc),$(shell command -v nvcc 2>/dev/null))
NVCC_CUDA := $(if $(NVCC),$(shell $(NVCC) --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p'))
ifeq ($(WITH_CUDA),auto)
WITH_CUDA := $(if $(and $(CUDA_SOURCES),$(NVCC_CUDA)),$(if $(filter $(NVCC_CUDA).%,$(TORCH_CUDA)),1,0),0)
endif

BUILD ?= build/$(TORCH_VERSION)
LIB := $(BUILD)/libdinossl_$(NAME).so
FALLBACK := the PyTorch fallback stays in use
CPU_OBJECTS := $(SOURCES:%.cpp=$(BUILD)/%.o)
CUDA_OBJECTS := $(if $(filter 1,$(WITH_CUDA)),$(CUDA_SOURCES:%.cu=$(BUILD)/%.o))
# nvcc links when there is CUDA code: it knows where its runtime library is.
LINK := $(if $(CUDA_OBJECTS),$(NVCC) -shared -cudart shared -Xcompiler -fopenmp,$(CXX) -shared -fopenmp)
CUDA_LIBS := $(if $(CUDA_OBJECTS),-lc10_cuda -ltorch_cuda)

.PHONY: all check clean
all: check $(LIB)

check:
	@test -n "$(TORCH_VERSION)" || { echo "$(NAME): '$(PYTHON)' cannot import torch, so $(NAME)/ is not built and" \
	  "$(FALLBACK); build with: make -C $(NAME) PYTHON=/path/to/venv/bin/python" >&2; exit 1; }
	@command -v $(CXX) >/dev/null 2>&1 || { echo "$(NAME): no C++ compiler '$(CXX)', so $(NAME)/ is not built and" \
	  "$(FALLBACK); install g++ (or set CXX) and run make -C $(NAME) again" >&2; exit 1; }

$(BUILD)/%.o: %.cpp $(wildcard *.h) | check
	@mkdir -p $(@D)
	@$(CXX) $(CXXFLAGS) -std=c++20 -fPIC -fopenmp -ffp-contract=off $(TORCH_FLAGS) -c $< -o $@.tmp && mv $@.tmp $@ \
	  || { rm -f $@.tmp; echo "$(NAME): compiling $< with $(CXX) failed (errors above), so $(NAME)/ is not built" \
	  "and $(FALLBACK)" >&2; exit 1; }

$(BUILD)/%.o: %.cu $(wildcard *.h) | check
	@mkdir -p $(@D)
	@$(NVCC) -O3 -std=c++20 -Xcompiler -fPIC --expt-relaxed-constexpr $(TORCH_FLAGS) \
	  $(foreach a,$(CUDA_ARCHS),-gencode arch=compute_$(a),code=sm_$(a)) \
	  -gencode arch=compute_$(lastword $(CUDA_ARCHS)),code=compute_$(lastword $(CUDA_ARCHS)) \
	  -c $< -o $@.tmp && mv $@.tmp $@ || { rm -f $@.tmp; echo "$(NAME): compiling $< with $(NVCC) failed (errors" \
	  "above), so $(NAME)/ is not built and $(FALLBACK); WITH_CUDA=0 builds the CPU kernel alone" >&2; exit 1; }

$(LIB): $(CPU_OBJECTS) $(CUDA_OBJECTS)
	@$(LINK) $^ -L$(TORCH_LIB) -lc10 -ltorch_cpu $(CUDA_LIBS) -o $@.tmp \
	  && mv $@.tmp $@ || { rm -f $@.tmp; echo "$(NAME): linking $@ failed (errors above), so $(FALLBACK)" >&2; exit 1; }
	@echo "$(NAME): built $(NAME)/$@ ($(if $(CUDA_OBJECTS),CPU and CUDA,CPU) kernels)"

clean:
	rm -rf build
