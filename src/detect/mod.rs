//! Inspection: the decoder that turns encoder features into an anomaly map, a score, regions and a
//! verdict. [`detector`] holds the `Detector` and the enrolment values it applies; [`features`] the
//! patch descriptors and the nearest-neighbour search; [`ivf`] its approximate form for large banks; [`map`] grid operations; [`regions`] connected
//! regions; [`background`] the plain-backdrop mask; [`normal`] the model of good parts' score spread;
//! [`drift`] the watch on the line's scores; [`overlay`] heat maps; [`zones`] the regions an operator
//! ignores or inspects; [`classes`] the defect classes an operator labelled; [`gpu`] the same on the GPU.

pub mod background;
pub mod classes;
pub mod detector;
pub mod drift;
pub mod enrolment;
pub mod features;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod inspection;
pub mod ivf;
pub mod map;
pub mod normal;
pub mod overlay;
pub mod regions;
pub mod zones;
